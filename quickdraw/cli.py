"""The ``quickdraw`` console script: one entry point, a subcommand per job.

Subcommands live in ``quickdraw.commands``; each module registers its own arguments and imports
heavy dependencies (TensorFlow, gRPC) only when it runs, so ``quickdraw --help`` stays fast. A command that
needs an extra this install lacks (TensorFlow: ``pip install 'quickdraw-service[tf]'``) says so in one line
and exits 2 (``quickdraw.extras``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from doodle.errors import DoodleError
from quickdraw.extras import MissingExtra, from_import_error

#: Subcommand name -> module under quickdraw.commands, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "download": "download",
    "render": "render",
    "inspect": "inspect_cmd",
    "train": "train",
    "evaluate": "evaluate",
    "predict": "predict",
    "serve": "serve",
    "classify": "classify",
    "loadtest": "loadtest",
}

DESCRIPTION = """\
Quick, Draw! doodle classification: data tools, training and the serving gateway.

Data is read from files in Google's formats (numpy_bitmap .npy, simplified/raw .ndjson, binary .bin,
sketch-rnn .npz). Run 'quickdraw COMMAND --help' for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="quickdraw", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, module_name in COMMANDS.items():
        module = importlib.import_module(f"quickdraw.commands.{module_name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand and return its exit code."""
    # TensorFlow's C++ INFO lines (CPU features, oneDNN notes) drown the output of every command.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (DoodleError, MissingExtra) as exc:
        print(f"quickdraw {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency imported deeper down: name its extra
        missing = from_import_error(exc)
        if missing is None:
            raise
        print(f"quickdraw {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
