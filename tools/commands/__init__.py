"""Operator subcommands of `contree-mcp` beside the server (dispatched by `tools.cli.SUBCOMMANDS`):

    publish.py  images publish|unpublish|published: images every --http-tokens-file principal sees
    prune.py    images prune: give disk back from an engine home (safe beside a running server)
"""
