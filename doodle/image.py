"""PNG or JPEG images of any size and mode to 28x28 grayscale, by the numpy_bitmap conventions.

The conventions: strokes bright (255) on a dark (0) background, the drawing centred and scaled so
that its larger side spans about 25 of the 28 pixels, as a 256-unit drawing with a 16-unit line does
in Google's rendering. Dark-on-light images are inverted; transparent images use their alpha as ink.
Limits on encoded bytes, on decoded pixels and on a JPEG's scans refuse decompression bombs and images that are
slow to decode (thousands of progressive refinement scans) before any pixel is decoded.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from doodle.drawing import BITMAP_SIDE
from doodle.errors import ImageDecodeError
from doodle.raster import LINE_WIDTH, ORIGINAL_SIDE, PADDING

ALLOWED_FORMATS = frozenset({"PNG", "JPEG"})
#: Fraction of the 28-pixel side that a drawing's bounding box (strokes included) covers.
CONTENT_FRACTION = (ORIGINAL_SIDE + LINE_WIDTH) / (ORIGINAL_SIDE + 2 * PADDING + LINE_WIDTH)
#: A pixel counts as ink above this level (0..255) when finding the drawing's bounding box.
INK_THRESHOLD = 32
#: Images are first resampled to this multiple of 28 pixels, where thin strokes are thickened.
OVERSAMPLE = 4
#: Google's line width at the oversampled scale: 16 units of the 304-unit canvas that maps onto 28 pixels.
TARGET_WIDTH_MID = LINE_WIDTH * BITMAP_SIDE * OVERSAMPLE / (ORIGINAL_SIDE + 2 * PADDING + LINE_WIDTH)
#: The pixel count in Pillow's decompression-bomb message, and object addresses in any of its messages.
_BOMB_SIZE = re.compile(r"Image size \((\d+) pixels\)")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: The next marker after a scan's entropy-coded data: 0xFF (and fill bytes) then neither a stuffed 0x00 nor RSTn.
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")
#: JPEG markers without a length field: TEM, RST0-7, SOI (EOI ends the walk).
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_SOS, _EOI = 0xDA, 0xD9


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Limits that refuse oversized or hostile images before they are decoded."""

    max_image_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024
    max_image_side_px: int = 8192
    #: Scans (SOS segments) in a JPEG: a normal progressive JPEG has about 10, each one a pass over every block.
    max_jpeg_scans: int = 32


def decode_image(data: bytes, limits: ImageLimits | None = None) -> NDArray[np.uint8]:
    """Decode PNG/JPEG bytes to a 28x28 uint8 bitmap, strokes bright on dark and centred.

    Raises ImageDecodeError naming the limit or the reason when the image is refused. Its message depends on
    the bytes alone (no object addresses), so the same bytes always get the same message.
    """
    limits = limits or ImageLimits()
    if len(data) == 0:
        raise ImageDecodeError("image is empty", "image")
    if len(data) > limits.max_image_bytes:
        raise ImageDecodeError(
            f"image is {len(data)} bytes, over the limit of max_image_bytes={limits.max_image_bytes}",
            "max_image_bytes",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            # Only the header has been read so far: check the size before decoding pixels.
            w, h = img.size
            if w <= 0 or h <= 0 or max(w, h) > limits.max_image_side_px:
                raise ImageDecodeError(
                    f"image is {w}x{h} pixels; each side must be 1..{limits.max_image_side_px} "
                    "(max_image_side_px)",
                    "max_image_side_px",
                )
            if w * h > limits.max_image_pixels:
                raise ImageDecodeError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of max_image_pixels={limits.max_image_pixels}",
                    "max_image_pixels",
                )
            if img.format == "JPEG" and (scans := jpeg_scans(data, limits.max_jpeg_scans)) > limits.max_jpeg_scans:
                raise ImageDecodeError(
                    f"JPEG has {scans} or more scans, over the limit of max_jpeg_scans={limits.max_jpeg_scans}",
                    "max_jpeg_scans",
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard fires while reading the header, before our checks above can run.
        size = _BOMB_SIZE.search(str(exc))
        raise ImageDecodeError(
            f"image is {size.group(1) + ' pixels' if size else 'too large to decode'}, over the limit of "
            f"max_image_pixels={limits.max_image_pixels}",
            "max_image_pixels",
        ) from exc
    except UnidentifiedImageError as exc:
        # Pillow's message names the BytesIO object, address and all: the same bytes would get a new message.
        raise ImageDecodeError("not a decodable PNG or JPEG image", "image") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {_ADDRESS.sub('', str(exc))}", "image") from exc
    return image_to_bitmap(img)


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The scans (SOS segments) of a JPEG, counted by walking its marker segments; stops at ``stop_after + 1``.

    Cheap whatever the size: 0xFF in entropy-coded data is followed by a stuffed 0x00 (or is an RSTn marker), so
    each scan's data is skipped with one search for the next real marker. Corrupt structure ends the walk (the
    decoder then reports it).
    """
    scans, pos, end = 0, 2, len(data)
    while pos + 4 <= end and scans <= stop_after:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == _SOS:
            scans += 1
            if (found := _NEXT_MARKER.search(data, pos)) is None:
                break
            pos = found.start()
    return scans


def image_to_bitmap(img: Image.Image) -> NDArray[np.uint8]:
    """Any Pillow image to the 28x28 convention: ink bright, cropped, centred and scaled."""
    ink = _ink(img)
    mask = ink > INK_THRESHOLD
    if not mask.any():
        return np.zeros((BITMAP_SIDE, BITMAP_SIDE), dtype=np.uint8)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # Centre of the ink's bounding box, and the source span that maps onto the 28 output pixels so
    # that the larger side of the box covers CONTENT_FRACTION of them; kept at sub-pixel precision,
    # because half a pixel of offset costs a lot of agreement with 1.5-pixel-wide strokes.
    cy = (rows[0] + rows[-1] + 1) / 2.0
    cx = (cols[0] + cols[-1] + 1) / 2.0
    extent = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    span = extent / CONTENT_FRACTION
    box = (cx - span / 2, cy - span / 2, cx + span / 2, cy + span / 2)
    # Pad so that the box lies inside the image (resize's box must not leave it).
    pad = int(np.ceil(max(0.0, -box[0], -box[1], box[2] - ink.shape[1], box[3] - ink.shape[0]))) + 1
    padded = np.pad(ink, pad) if pad else ink
    shifted = (box[0] + pad, box[1] + pad, box[2] + pad, box[3] + pad)
    side = BITMAP_SIDE * OVERSAMPLE
    mid = Image.fromarray(padded, mode="L").resize((side, side), Image.Resampling.BOX, box=shifted)
    mid = _thicken(np.asarray(mid, dtype=np.uint8))
    return np.asarray(Image.fromarray(mid, mode="L").reduce(OVERSAMPLE), dtype=np.uint8)


def stroke_width(ink: NDArray[np.uint8]) -> float:
    """Mean stroke width in pixels of an ink image: twice the ink area over its outline length.

    A stroke of width w and length L has area wL and an outline of about 2L, whatever its shape.
    """
    mask = ink > INK_THRESHOLD
    area = int(mask.sum())
    if area == 0:
        return 0.0
    edges = int((mask[:, 1:] != mask[:, :-1]).sum() + (mask[1:] != mask[:-1]).sum())
    edges += int(mask[:, 0].sum() + mask[:, -1].sum() + mask[0].sum() + mask[-1].sum())
    return 2.0 * area / max(edges, 1)


def _thicken(mid: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Dilate strokes thinner than Google's line, so a thin-pen canvas looks like the training data.

    Browser canvases and phone screenshots often draw 2-6 px lines on a 300-1000 px image; scaled to
    28x28 such a line is a faint quarter-pixel smear, unlike the 1.5-pixel strokes the model learned.
    """
    width = stroke_width(mid)
    missing = TARGET_WIDTH_MID - width
    if width == 0.0 or missing < 0.25 * TARGET_WIDTH_MID:
        return mid
    radius = max(1, round(missing / 2.0))
    out = mid.copy()
    padded = np.pad(mid, radius)
    n = mid.shape[0]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius + radius:  # a disc, not a square
                np.maximum(out, padded[radius + dy : radius + dy + n, radius + dx : radius + dx + n], out=out)
    return out


def _ink(img: Image.Image) -> NDArray[np.uint8]:
    """The ink of an image as uint8, bright on dark, whatever its mode and polarity."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.uint8)
        if alpha.min() < 250:
            # Transparent background: the ink is where the alpha is, whatever its colour.
            return alpha
        img = rgba.convert("RGB")
    gray = np.asarray(img.convert("L"), dtype=np.uint8)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:
        gray = 255 - gray
    return gray
