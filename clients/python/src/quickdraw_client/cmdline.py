"""What every ``quickdraw`` command line shares, the client's and the server's: ``--debug`` and one-line errors.

A failure prints one line, ``quickdraw COMMAND: error: ...``, and exits non-zero: 2 for a :class:`UsageError`
(a mistake on the command line or in its inputs), 1 otherwise. ``--debug`` (anywhere on the line before ``--``,
or ``QUICKDRAW_DEBUG=1``) shows the traceback instead. The client's command (``quickdraw_client.cli``) and the
server package's (``quickdraw.cli``) both import this module; it imports neither.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from quickdraw_client.files import InputError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "QUICKDRAW_DEBUG"


class UsageError(Exception):
    """A mistake on the command line or in its inputs; printed as one line (exit code 2)."""


def split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (which may stand anywhere before ``--``), and whether it or ``QUICKDRAW_DEBUG``
    asks for tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    debug = DEBUG_FLAG in args[:end]
    kept = [a for a in args[:end] if a != DEBUG_FLAG] + args[end:]
    return kept, debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message, with its type when the message alone would not say much."""
    text = " ".join(str(exc).split())
    if isinstance(exc, (UsageError, InputError, ValueError, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
