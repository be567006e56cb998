"""Quiet TensorFlow: no C++ log lines on the terminal unless the log level is DEBUG.

Importing TensorFlow 2.21 prints a block of C++ lines (oneDNN, "Could not find cuda drivers", ...) from each of
two libraries' static initialisers, before absl's logging is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach
them: that is the "7 lines, twice" of one ``import tensorflow`` (one process, one initialisation). Later lines
(``E0000 ... failed call to cuInit`` on a machine without a GPU) do obey ``TF_CPP_MIN_LOG_LEVEL``.

So :func:`configure` sets ``TF_CPP_MIN_LOG_LEVEL`` (3: fatal only; TensorFlow's real errors reach Python as
exceptions) unless the user set it, and :func:`import_tensorflow` imports TensorFlow with file descriptor 2
captured, then writes back every captured line that is not one of TensorFlow's C++ log lines. At DEBUG level
nothing is hidden.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import tempfile

ENV = "TF_CPP_MIN_LOG_LEVEL"
#: Whether the user chose TF_CPP_MIN_LOG_LEVEL themselves (then it is left alone).
USER_SET = ENV in os.environ
#: TensorFlow's (absl's) C++ log lines, and the notes that come with them.
TF_LINE = re.compile(
    r"^(?:[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)"
)


def configure(debug: bool) -> None:
    """Set TensorFlow's C++ log level for this process and its children: everything when ``debug``, else fatal
    errors only. A value the user set in the environment wins."""
    if not USER_SET:
        os.environ[ENV] = "0" if debug else "3"


def import_tensorflow(debug: bool = False) -> None:
    """Import TensorFlow once, with its start-up C++ lines dropped unless ``debug``."""
    configure(debug)
    if "tensorflow" in sys.modules:
        return
    if debug:
        importlib.import_module("tensorflow")
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            kept = [line for line in text.splitlines() if line.strip() and not TF_LINE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
