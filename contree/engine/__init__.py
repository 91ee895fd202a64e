"""The embedded engine: crun + overlayfs sandboxes over an immutable layer store (docs/contracts.md §4).

Three floors; each imports only from its own floor and those below (tests/test_import_layers.py):

    storage/   layers, images and blobs on disk — no processes, no namespaces
    runtime/   sandboxes on a mounted rootfs — crun, cgroups, network, user namespaces, host clean-up
    (here)     operations: the runs that use both, the operation log, the Backend façade

The engine itself:
    local.py         LocalEngine: the `Backend` façade (checks, translates, submits runs) and nothing else
    parts.py         EngineParts: the started parts, typed (store, oplog, blobs, runtime, snapshots,
                     watchdog, queue, limits); EngineLimits, the engine's settings
    instance_run.py  InstanceRun: one instance from ASSIGNED to completion (lifecycle only)
    snapshots.py     Snapshotter: a run's rootfs — prepare → mounted, commit → image, release
    processes.py     Processes: spid 1 and exec'd processes (pumps, stdin, reaping, kill) and the event
                     payloads (api.EventData* Structs)
    import_run.py    ImportRun: one image import from EXECUTING to completion
    sandbox_run.py   SandboxRun(InstanceRun): a long-lived sandbox — contree-init as spid 1, execs through
                     it, the idle lease, stop (with commit), live snapshots under the freezer
    sandboxes.py     SandboxManager: the engine's long-lived sandboxes (`sandbox_api.SandboxHost`)
    keepalive.py     IdleLease: a sandbox's idle TTL, never counted while a foreground process runs
    spawn.py         spawn semantics of the API, pure: validation, argv/env/cwd plans, SpawnFailed
    oplog.py         operation records (SQLite) and the one lifecycle: TRANSITIONS, transition(), finish()
    eventlog.py      an operation's event log (JSONL), a run's output spill, folding events into results
    operations.py    the queue: per-kind concurrency, cooperative cancel
    prune.py         disk reclaimed across the home (images, layers, output spills, uploads)
    cli.py           `engine check`, `images bootstrap`, `python -m contree.engine.cli subids`
"""
