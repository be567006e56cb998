"""``quickdraw classify``: send drawings from files to a running gateway and print the top 3 of each.

One implementation, the client distribution's (``quickdraw_client.cli``): the same options and the same lines
from either install. The server package adds its readers, so ``.bin`` and ``.npz`` files work here too.

A drawing the model calls unknown (its out-of-class decision, issue 18) is printed as such, with its closest
classes, e.g. ``not a known class (known_score 0.12 < 0.50); closest: dog 0.67  cat 0.20  horse 0.05``.
"""

from __future__ import annotations

import argparse

FORMATS = (
    "FILE is a PNG/JPEG (sent as an image), an .ndjson (each line, sent as strokes; raw files as raw\n"
    "strokes, normalised by the server), a .bin or .npz (strokes) or an .npy (each row, as a bitmap)."
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand (the client's parser, with this install's file types)."""
    from quickdraw_client.cli import add_classify_parser

    add_classify_parser(sub, FORMATS).set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The client's ``classify``, reading files with the server package's readers."""
    from quickdraw.commands.common import read_for_classify
    from quickdraw_client.cli import run_classify

    return run_classify(args, reader=read_for_classify)
