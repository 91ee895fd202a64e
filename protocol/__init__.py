"""JSON-RPC 2.0 + MCP, hand-rolled (no MCP SDK): a sans-IO core and thin transports.

versions.py    negotiated revisions and the wire features each one gates
messages.py    JSON-RPC envelopes and MCP result shapes (msgspec Structs)
content.py     content blocks and resource contents
errors.py      error codes and the exceptions handlers raise
registry.py    the tool/resource/prompt/completion registry `tools/` fills (docs/contracts.md §1)
schema.py      JSON Schemas derived from msgspec types
catalog.py     paginated, version-gated, cached listings
session.py     the sans-IO session: bytes → Frame, rules, sync answers
context.py     RequestContext: progress, log, cancellation, server→client requests
server.py      Server/ServerSession: handler tasks, cancellation, routing, default sink
stdio.py       NDJSON transport
http.py, sse_legacy.py   Streamable HTTP and legacy HTTP+SSE transports
conformance.py the official conformance suite's fixtures (`python -m protocol.conformance`)
transcript.py  golden transcripts: normalise, replay, record (`python -m protocol.transcript`)
"""
