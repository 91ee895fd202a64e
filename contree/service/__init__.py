"""The engine service: one long-lived process per engine home hosting `LocalEngine` for every client.

MCP servers (and `serve-api`) are thin clients: they reach the home's service on `home/engine.sock`
(started on demand), so sessions share images, operations and their output, and work outlives the
session that started it.

  paths.py    the socket and log of a home; socket addresses for homes with long paths
  control.py  wire shapes of the control surface, version rules, a blocking control client
  idle.py     when the service may exit by itself (clients, operations, engine-side hooks)
  app.py      the aiohttp app: /v1 (the Contree REST API), /engine/ control, private engine routes
  server.py   EngineService: home lock, socket, engine, serve until stopped
  daemon.py   `engine serve --detach`: fork, own session, log file, readiness line
  starter.py  ensure_service: attach, auto-start, start races, stale sockets, version skew
  client.py   ServiceBackend: RemoteBackend over the socket, plus lineage, chunks and import roots
  cli.py      `contree-mcp engine serve | stop | status`
"""
