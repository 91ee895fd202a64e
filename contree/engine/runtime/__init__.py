"""Runtime layer of the embedded engine (package map written in a later commit)."""
