"""Every log record stripped of tokens, authorization values and raw header lines, at every level."""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


REDACTED = "[REDACTED]"
#: An authorization header's value, in any rendering (header line, dict or tuple repr): to the end of the line.
_AUTHORIZATION = re.compile(r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=,]\s*)[^\r\n]*")
#: ``Bearer <token>``, but not the phrase "bearer token" of our own messages.
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!token\b)\S+")
#: Raw bytes as Python shows them (aiohttp quotes a malformed header line, or its value, so in parse errors).
_BYTES_REPR = re.compile(r"""\bb(?:'(?:[^'\\\r\n]|\\.)*'|"(?:[^"\\\r\n]|\\.)*")""")
#: aiohttp's parse errors that quote a header or status line as text.
_QUOTED_LINE = re.compile(r"(?i)((?:invalid http header|bad status line|bad http method in status line|"
                          r"when reading)[:]?\s*)[^\r\n]*")  # fmt: skip


class LogRedactor:
    """Strips secrets from text: configured tokens, ``authorization`` values, ``Bearer`` tokens, raw header lines."""

    def __init__(self) -> None:
        self._tokens: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add_tokens(self, tokens: Iterable[str]) -> None:
        """Also redact these literal strings (the server's configured tokens), wherever they appear."""
        with self._lock:
            self._tokens = tuple(sorted({*self._tokens, *(t for t in tokens if t)}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        """``text`` without secrets."""
        for token in self._tokens:
            if token in text:
                text = text.replace(token, REDACTED)
        text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _QUOTED_LINE.sub(lambda m: m.group(1) + "[raw line redacted]", text)
        return _BYTES_REPR.sub("b'[raw bytes redacted]'", text)


#: The one redactor of this process, used by the log record factory that :func:`install_log_redaction` installs.
redact = LogRedactor()
_installed = False
_install_lock = threading.Lock()


def _redact_record(record: logging.LogRecord) -> None:
    """Render the record's message and traceback, redacted, in place of the originals."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging would print the raw arguments to stderr
        message, record.args = f"{record.msg!s} (unformattable log arguments dropped)", ()
        record.msg = redact(message)
    else:
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        # logging.Formatter shows exc_text when it is set, instead of formatting exc_info again
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install_log_redaction(tokens: Iterable[str] = ()) -> None:
    """Redact every log record of this process from now on, and these tokens too (idempotent; tokens add up).

    A ``logging.setLogRecordFactory`` wrapper, so it covers every logger and every handler, at every level:
    aiohttp's parse errors, gRPC's, asyncio's and ours alike.
    """
    global _installed
    redact.add_tokens(tokens)
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                _redact_record(record)
            except Exception:  # never lose a log line to the redactor; never show it unredacted either
                record.msg, record.args, record.exc_info, record.exc_text = "[log record redacted]", (), None, None
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
