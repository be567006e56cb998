"""Allows ``python -m quickdraw``."""

from quickdraw.cli import main

raise SystemExit(main())
