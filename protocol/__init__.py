"""JSON-RPC 2.0 + MCP, hand-rolled (no MCP SDK): a sans-IO core and thin transports, both protocol eras.

The core (no I/O, no asyncio; importable and testable on its own):
    types.py       request ids, the three outgoing message kinds (Reply, Notify, Ask), the Sink protocol
    versions.py    revisions of both eras, the wire features each gates, log levels
    errors.py      every error code (one meaning each) and the exceptions that carry them
    content.py     content blocks and resource contents
    messages.py    JSON-RPC envelopes, typed request params, MCP result shapes
    jsonrpc.py     framing: a frame's bytes → typed messages and params, and the errors they may earn
    schema.py      JSON Schemas derived from msgspec types
    registry.py    the tool/resource/prompt/completion registry `tools/` fills (docs/contracts.md §1)
    context.py     RequestContext: what a handler may do (its Host is the shell)
    catalog.py     paginated, version-gated, cached listings
    events.py      what the core hands the shell: Dispatch, Cancel, Answer, Listen, Provide, StopTask, Batch
    methods.py     which methods each era knows and what answering them takes
    headers.py     2026-07-28 HTTP header rules (Mcp-Method, Mcp-Name, Mcp-Param-*)
    stateless.py   2026-07-28 envelope: `_meta` keys, resultType, caching hints, serverInfo
    mrtr.py        2026-07-28 input-required results: the signed requestState
    tasks.py       the Tasks extension: task records and their state machine
    results.py     result shapes per revision (initialize, handler results, input_required)
    core.py        what all sessions of a server share (registry, listings, discovery, tasks, secret)
    session.py     the state machine: `Session.receive(bytes) -> [events]`, `finish`, `progress`, …

The shell and transports (asyncio):
    server.py      Server/ServerSession: runs handlers, cancels them, tasks, server→client requests
    stdio.py       NDJSON on stdin/stdout
    http_guard.py  HTTP settings and the Host/Origin/bearer checks
    sse.py         SSE framing, numbered streams with replay, serving a stream
    http.py        Streamable HTTP at /mcp (both eras)
    sse_legacy.py  legacy HTTP+SSE (2024-11-05)
    http_app.py    the aiohttp application for both HTTP transports, and serving it

testing/           conformance fixtures and golden-transcript tooling (not used by the server)
"""
