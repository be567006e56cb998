"""One module per ``quickdraw`` subcommand; each exposes ``add_parser`` and ``run``."""
