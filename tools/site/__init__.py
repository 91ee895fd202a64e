"""The HTTP docs site at `/` (HTTP mode): rendered from the registry at start-up, so it cannot drift.

    docs_site.py  docs_routes(registry, state, ...): Setup, Instructions, Tools, Resources, Prompts, Guides
    markdown.py   render(md): the small escaping markdown → HTML renderer the pages use
"""
