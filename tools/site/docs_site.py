"""The HTTP docs site at `/`: Setup, Instructions, Tools, Resources, Prompts, Guides.

Generated from the registry at start-up (so it cannot drift from what the server serves); plain HTML and
inline CSS, no JavaScript, no external assets."""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from protocol.registry import Registry
from tools.guides import GUIDES, guide_text
from tools.guides.guidance import TOOL_EXAMPLES, Guidance
from tools.site import markdown
from tools.state import ServerState

PAGES = [("/", "Setup"), ("/instructions", "Instructions"), ("/tools", "Tools"), ("/resources", "Resources"),
         ("/prompts", "Prompts"), ("/guides", "Guides")]  # fmt: skip

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#fafbfc}
header{background:#14324a;color:#fff;padding:14px 28px}header h1{margin:0;font-size:1.35em}
header span{opacity:.75;font-size:.9em}
nav{background:#1f4a6b;padding:0 20px}nav a{color:#e6f0f7;display:inline-block;padding:10px 12px;
text-decoration:none}nav a.current{background:#fafbfc;color:#14324a;font-weight:600}
main{max-width:980px;margin:0 auto;padding:20px 28px 60px}
pre{background:#0f1b26;color:#e7eef5;padding:12px 14px;border-radius:6px;overflow-x:auto;font-size:.88em}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
p code,li code,td code{background:#e9eef2;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:10px 0;width:100%}td,th{border:1px solid #d5dde3;padding:5px 8px;
text-align:left;vertical-align:top}th{background:#eef3f6}
section.item{border:1px solid #dde4e9;border-radius:8px;padding:6px 16px 12px;margin:14px 0;background:#fff}
.badge{display:inline-block;font-size:.75em;padding:1px 7px;border-radius:10px;margin-left:6px;
background:#e3ecf2;color:#14324a}.badge.warn{background:#fde8e1;color:#7a2a10}
details summary{cursor:pointer;font-weight:600;margin:6px 0}
"""


def page(title: str, current: str, body: str, *, version: str) -> str:
    links = "".join(
        f'<a href="{href}"{" class=current" if href == current else ""}>{html.escape(name)}</a>'
        for href, name in PAGES
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)} · contree-mcp</title><style>{CSS}</style></head><body>"
        f"<header><h1>contree-mcp <span>{html.escape(version)}</span></h1></header>"
        f"<nav>{links}</nav><main><h2 id=page-title>{html.escape(title)}</h2>{body}</main></body></html>"
    )


def setup_body(state: ServerState, listen: str, port: int, token: bool) -> str:
    host = "localhost" if listen in ("127.0.0.1", "0.0.0.0", "::", "::1") else listen
    url = f"http://{host}:{port}/mcp"
    backend = "--backend local" if state.backend_kind == "local" else "--backend contree"
    snippets = [
        ("Claude Code (stdio)", f"claude mcp add --transport stdio contree -- contree-mcp {backend}"),
        (
            "Claude Code (HTTP)",
            f"claude mcp add --transport http contree {url}"
            + (' --header "Authorization: Bearer $CONTREE_MCP_HTTP_TOKEN"' if token else ""),
        ),
        (
            "Codex CLI (~/.codex/config.toml)",
            f'[mcp_servers.contree]\ncommand = "contree-mcp"\nargs = ["{backend.split()[0]}", '
            f'"{backend.split()[1]}"]',
        ),
        (
            "Claude Desktop (claude_desktop_config.json)",
            json.dumps(
                {"mcpServers": {"contree": {"command": "contree-mcp", "args": backend.split()}}}, indent=2
            ),
        ),
        (
            "This server over HTTP",
            f"contree-mcp {backend} --mode http --http-listen {listen} --http-port {port}",
        ),
    ]
    parts = [
        "<p>An MCP server that gives agents isolated Linux sandboxes with immutable, branchable images. "
        "This instance uses the "
        f"<strong>{'embedded engine' if state.backend_kind == 'local' else 'Contree API'}"
        "</strong> backend.</p>",
    ]
    for title, code in snippets:
        parts.append(f"<h3>{html.escape(title)}</h3><pre><code>{html.escape(code)}</code></pre>")
    parts.append(
        "<h3>Useful flags</h3><table><thead><tr><th>Flag</th><th>Meaning</th></tr></thead><tbody>"
        "<tr><td><code>--backend local|contree</code></td><td>embedded engine or Contree API</td></tr>"
        "<tr><td><code>--home PATH</code></td><td>embedded engine state directory (default: "
        "<code>$CONTREE_ENGINE_HOME</code>, else <code>$XDG_DATA_HOME/contree-mcp</code>)</td></tr>"
        "<tr><td><code>--allowed-root PATH</code></td><td>host directory rsync/upload/download may use "
        "(repeatable; default: the current directory)</td></tr>"
        "<tr><td><code>--mode http --http-listen ADDR --http-port N</code></td><td>Streamable HTTP at "
        "<code>/mcp</code></td></tr>"
        "<tr><td><code>--http-token TOKEN</code></td><td>bearer token; required beyond loopback</td></tr>"
        "<tr><td><code>--http-tokens-file FILE</code></td><td>one "
        "<code>&lt;principal&gt; &lt;token&gt;</code> line per client; each sees only its own operations "
        "and directory states</td></tr>"
        "<tr><td><code>--token / --url / --project / --profile</code></td><td>Contree API "
        "credentials</td></tr>"
        "<tr><td><code>contree-mcp images bootstrap</code></td><td>create the base images of the "
        "engine</td></tr>"
        "</tbody></table>"
    )
    return "".join(parts)


def _type_of(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " | ".join(_type_of(p) for p in prop["anyOf"])
    if "enum" in prop:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
    t = prop.get("type", "object" if "$ref" in prop else "any")
    if t == "array":
        return f"array<{_type_of(prop.get('items', {}))}>"
    if t == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"object<string, {_type_of(prop['additionalProperties'])}>"
    return str(t)


def tools_body(registry: Registry, guidance: Guidance) -> str:
    parts = ["<ul>" + "".join(f'<li><a href="#{t}">{t}</a></li>' for t in registry.tools) + "</ul>"]
    for tool in registry.tools.values():
        first = tool.description.split("\n\n", 1)[0]
        ann = tool.annotations
        badges = []
        if ann is not None:
            if ann.read_only:
                badges.append("<span class=badge>read-only</span>")
            if ann.destructive:
                badges.append("<span class='badge warn'>destructive</span>")
            if ann.open_world:
                badges.append("<span class=badge>open-world</span>")
        rows = []
        schema = tool.input_schema
        required = set(schema.get("required", []))
        for pname, prop in schema.get("properties", {}).items():
            default = (
                "required" if pname in required else json.dumps(prop.get("default"), ensure_ascii=False)
            )
            rows.append(
                f"<tr><td><code>{html.escape(pname)}</code></td><td><code>{html.escape(_type_of(prop))}</code></td>"
                f"<td><code>{html.escape(default)}</code></td>"
                f"<td>{html.escape(prop.get('description', ''))}</td></tr>"
            )
        params = (
            "<table><thead><tr><th>Parameter</th><th>Type</th><th>Default</th><th>Description</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            if rows
            else "<p>No parameters.</p>"
        )
        parts.append(
            f'<section class=item id="{tool.name}"><h3><code>{tool.name}</code>{"".join(badges)}</h3>'
            f"<p>{html.escape(first)}</p>{params}"
            f"<p>Example:</p><pre><code>{html.escape(guidance.render(TOOL_EXAMPLES.get(tool.name, '')))}"
            "</code></pre>"
            "<details><summary>Full "
            f"description</summary><pre><code>{html.escape(tool.description)}</code></pre>"
            "</details></section>"
        )
    return "".join(parts)


def resources_body(registry: Registry) -> str:
    parts = ["<h3>Resource templates</h3>"]
    for t in registry.templates.values():
        parts.append(
            f"<section class=item><h4><code>{html.escape(t.uri_template)}</code></h4>"
            f"<p>{html.escape(t.description or '')}</p><p>MIME type: "
            f"<code>{html.escape(t.mime_type or '')}</code>"
            "</p></section>"
        )
    parts.append(
        "<h3>Resources</h3><table><thead><tr><th>URI</th><th>Title</th><th>MIME type</th></tr></thead><tbody>"
    )
    for r in registry.resources.values():
        parts.append(
            f"<tr><td><code>{html.escape(r.uri)}</code></td><td>{html.escape(r.title or r.name)}</td>"
            f"<td><code>{html.escape(r.mime_type or '')}</code></td></tr>"
        )
    parts.append("</tbody></table>")
    return "".join(parts)


def prompts_body(registry: Registry) -> str:
    parts = []
    for p in registry.prompts.values():
        args = "".join(
            f"<tr><td><code>{html.escape(a.name)}</code></td><td>{'yes' if a.required else 'no'}</td>"
            f"<td>{html.escape(a.description or '')}</td></tr>"
            for a in p.arguments
        )
        parts.append(
            "<section class=item "
            f'id="{p.name}"><h3><code>{p.name}</code></h3><p>{html.escape(p.description or "")}'
            "</p><table><thead><tr><th>Argument</th><th>Required</th><th>Description</th></tr></thead>"
            f"<tbody>{args}</tbody></table></section>"
        )
    return "".join(parts)


def guides_body(state: ServerState) -> str:
    parts = ["<ul>" + "".join(f'<li><a href="#guide-{g}">{g}</a></li>' for g in GUIDES) + "</ul>"]
    for g in GUIDES:
        parts.append(
            f'<details class=item id="guide-{g}"><summary><code>contree://guide/{g}</code></summary>'
            f"{markdown.render(guide_text(g, state.guidance_now()), heading_offset=2)}</details>"
        )
    return "".join(parts)


def render_site(
    registry: Registry, state: ServerState, *, listen: str, port: int, token: bool = False
) -> dict[str, str]:
    version = registry.version or ""
    bodies = {
        "/": setup_body(state, listen, port, token),
        "/instructions": markdown.render(registry.instructions or "", heading_offset=1),
        "/tools": tools_body(registry, state.guidance_now()),
        "/resources": resources_body(registry),
        "/prompts": prompts_body(registry),
        "/guides": guides_body(state),
    }
    return {path: page(title, path, bodies[path], version=version) for path, title in PAGES}


def docs_routes(
    registry: Registry, state: ServerState, *, listen: str, port: int, token: bool = False
) -> list[web.RouteDef]:
    """GET routes for every page; `token` says clients must send a bearer token (shown in the snippets)."""
    pages = render_site(registry, state, listen=listen, port=port, token=token)

    def handler(path: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        body = pages[path]

        async def serve(request: web.Request) -> web.Response:
            return web.Response(text=body, content_type="text/html", charset="utf-8")

        return serve

    return [web.get(path, handler(path)) for path in pages]
