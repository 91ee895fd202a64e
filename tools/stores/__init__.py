"""What the tools keep themselves, in SQLite beside the engine home (`<home>/mcp/`) or the Contree config
(`~/.config/contree/mcp/`), so it holds over any Backend and survives restarts:

    sqlite_cache.py  SqliteCache: one locked connection a store shares between threads
    dirstate.py      DirectoryStates: rsync's directory states (immutable manifests, by principal)
    lineage.py       Lineage: parent/child edges of images (the engine's own when it has them, else recorded)
    owners.py        OperationOwners: which principal started which operation (HTTP tokens)
    image_scope.py   ImageScope: which images and tags each principal sees; published images
"""
