"""`python -m contree.service serve|stop|status`: how a starter runs the service without `tools/`."""

from contree.service.cli import main

raise SystemExit(main())
