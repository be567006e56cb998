"""The ``quickdraw`` console script: one entry point, a subcommand per job.

Subcommands live in ``quickdraw.commands``; each module registers its own arguments and imports
heavy dependencies (TensorFlow, gRPC) only when it runs, so ``quickdraw --help`` stays fast. A command that
needs an extra this install lacks (TensorFlow: ``pip install 'quickdraw-service[tf]'``) says so in one line
and exits 2 (``quickdraw.extras``).

Every failure is one line, ``quickdraw COMMAND: error: ...``, and a non-zero exit code: 2 for a mistake in the
command line or its inputs (a missing file, a port in use, no model directory, a missing extra), 1 otherwise.
``--debug`` (anywhere on the line, or ``QUICKDRAW_DEBUG=1``) shows the traceback instead. TensorFlow's C++ log lines are
hidden unless the log level is DEBUG (``-vv``, or ``quickdraw serve --log-level debug``): ``quickdraw.quiet``.

The client distribution (quickdraw-client) installs a ``quickdraw`` script too; it runs this command line when
this package is installed, and ``classify`` here is the client's (``quickdraw_client.cli``). Both print failures
the same way (``quickdraw_client.cmdline``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from doodle.errors import DoodleError
from quickdraw import quiet
from quickdraw.extras import MissingExtra, from_import_error, installed
from quickdraw_client.cmdline import UsageError, one_line, split_debug

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
    "rollout": "rollout",
}
#: Commands that import TensorFlow (``serve`` does when its backend is embedded: quickdraw.commands.serve).
TENSORFLOW_COMMANDS = {"train", "evaluate", "predict"}

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
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure, not one line "
                        "(anywhere on the line; or QUICKDRAW_DEBUG=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, module_name in COMMANDS.items():
        module = importlib.import_module(f"quickdraw.commands.{module_name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the chosen subcommand and return its exit code."""
    argv, debug = split_debug(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet.configure(debug=args.verbose >= 2)  # before anything imports TensorFlow
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command in TENSORFLOW_COMMANDS and installed("tensorflow"):
            quiet.import_tensorflow(debug=args.verbose >= 2)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, ModuleNotFoundError):  # an optional dependency imported deeper down: name its extra
            exc = from_import_error(exc) or exc
        known = isinstance(exc, (DoodleError, MissingExtra))
        print(f"quickdraw {args.command}: error: {exc if known else one_line(exc)}", file=sys.stderr)
        return 2 if known or isinstance(exc, UsageError) else 1
