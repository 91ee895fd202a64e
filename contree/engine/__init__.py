"""The embedded engine: crun + overlayfs sandboxes over an immutable layer store."""
