"""Errors raised by the drawing library; each names the file and where in it the problem is."""

from __future__ import annotations

import os


class DoodleError(Exception):
    """Base class for every error the drawing library raises on purpose."""


class DrawingFormatError(DoodleError):
    """A file or record does not follow its Quick, Draw! format.

    ``location`` says where: ``line 17`` for ndjson, ``byte offset 4096`` for binary and npy,
    ``'train'[3]`` for sketch-rnn npz.
    """

    def __init__(self, path: str | os.PathLike[str], location: str, reason: str) -> None:
        self.path = os.fspath(path)
        self.location = location
        self.reason = reason
        super().__init__(f"{self.path}: {location}: {reason}")


class ImageDecodeError(DoodleError):
    """An encoded image could not be turned into a 28x28 bitmap.

    ``field`` is the name of the limit or property that failed (e.g. ``max_image_bytes``), so that
    callers such as the gateway can report it as a field violation.
    """

    def __init__(self, reason: str, field: str = "image") -> None:
        self.reason = reason
        self.field = field
        super().__init__(reason)


class EmptyDrawingError(DoodleError):
    """A drawing has no strokes or no points, so there is nothing to render."""
