"""`python -m tools` is the same as the `contree-mcp` console script."""

from tools.cli import main

raise SystemExit(main())
