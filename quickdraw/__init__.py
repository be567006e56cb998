"""quickdraw: the ``quickdraw`` command line, and (under ``quickdraw.v1``) the generated public API code."""
