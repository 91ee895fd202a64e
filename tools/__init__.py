"""The MCP surface of contree-mcp: tools, resources, prompts, guides and the HTTP docs site.

Imports flow downwards in this map: `cli` → `app` → the registrations → what they share → `stores`;
nothing here is imported by `protocol/` or `contree/`.

Process entry
    __main__.py        `python -m tools` = the `contree-mcp` console script
    cli.py             flags → backend → Server → transport; subcommands dispatched to their modules
    app.py             wiring: build_state(backend, …) → ServerState, build_registry(state); TOOLS = the
                       tools in tools/list order
    state.py           ServerState: what every tool needs (backend, stores, limits), passed explicitly
    version.py         __version__
    http_tokens.py     --http-tokens-file: bearer token → principal
    worker_threads.py  the default executor (daemon workers that never hold the exit)
    engine_error.py    stdio: answer every request with the reason the engine could not start
    commands/          `contree-mcp images publish|unpublish|published|prune`

The MCP tools (one module per family; each has `register…(registry, state)` functions)
    image_tools.py      list_images, get_image, set_tag
    import_tools.py     registry_token_obtain, registry_auth, import_image
    run_tool.py         run
    sync_tools.py       rsync, upload, download
    operation_tools.py  get_operation, list_operations, wait_operations, cancel_operation
    info_tools.py       whoami, get_guide
    inspect_tools.py    list_files, read_file, grep
    disk_tools.py       delete_image
    sandbox_tools.py    start_sandbox, exec, write_stdin, signal_process, get_process, expose_port,
                        snapshot_sandbox, stop_sandbox, list_sandboxes (+ the process output resources)

The rest of the MCP surface
    resources.py  guides, image and operation resource templates, completions
    prompts.py    the eleven prompts
    guides/       the guide texts and the guidance rendered for this backend (instructions, examples)

What the tools share
    models.py       result Structs (outputSchema), `api` Structs reused where the shape is the same
    sandbox_models.py  the sandbox tools' params and results
    sandbox_hosts.py   where sandboxes live: the engine's /v1/sandboxes, or the cloud's subprocess API
    convert.py      backend (`contree.api`) Structs → result Structs
    output.py       a run's whole output: pages for the resources, heads and tails for results
    budget.py       how big a result may be (RESULT_BUDGET) and how to cut text to fit
    waiting.py      following an operation to its end (events, then polling)
    image_files.py  reading an image's files and directories through the backend
    refs.py         image references (UUID, tag:<tag>, bare tag)
    errors.py       backend errors → ToolError
    bounds.py       upper bounds of numeric parameters
    roots.py        allowed host roots (rsync, upload, download)

Persistent state and the docs site
    stores/  SQLite kept by the tools: directory states, lineage edges, operation owners, image scoping
    site/    the HTTP docs site at `/`, generated from the registry
"""
