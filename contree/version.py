"""The version of contree-mcp, the one distribution that ships `protocol/`, `tools/` and `contree/`.

A constant rather than the installed metadata: reading that (`importlib.metadata`) at import cost every
start ~25 ms. tests/tools/test_version.py pins it to pyproject.toml's version.
"""

VERSION = "0.6.0"
