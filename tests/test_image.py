"""PNG/JPEG decoding to the 28x28 convention: polarity, centring, modes and decompression-bomb limits."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from doodle import ImageDecodeError, ImageLimits, decode_image, rasterize
from doodle.formats import open_bitmaps, read_ndjson


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.fixture(scope="module")
def cats(sample: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(large rendering 280x280, Google's 28x28 bitmap) for the first 10 cats."""
    rows = open_bitmaps(sample / "numpy_bitmap" / "cat.npy")
    drawings = list(read_ndjson(sample / "simplified" / "cat.ndjson", limit=10))
    return [(rasterize(d.strokes, side=280), rows[i].reshape(28, 28)) for i, d in enumerate(drawings)]


@pytest.mark.parametrize("mode", ["light-on-dark", "dark-on-light", "rgb-jpeg", "transparent-rgba", "palette"])
def test_decoded_images_match_googles_bitmaps(cats: list, mode: str) -> None:
    scores = []
    for big, ref in cats:
        if mode == "light-on-dark":
            data = _png(Image.fromarray(big))
        elif mode == "dark-on-light":
            data = _png(Image.fromarray(255 - big))
        elif mode == "rgb-jpeg":
            data = _png(Image.fromarray(255 - big).convert("RGB"), "JPEG")
        elif mode == "transparent-rgba":
            rgba = np.zeros((*big.shape, 4), dtype=np.uint8)
            rgba[..., 3] = big  # black ink, transparent paper, as a browser canvas exports it
            data = _png(Image.fromarray(rgba, mode="RGBA"))
        else:
            data = _png(Image.fromarray(255 - big).convert("P"))
        out = decode_image(data)
        assert out.shape == (28, 28) and out.dtype == np.uint8
        scores.append(_corr(out, ref))
    print(f"\n{mode}: mean correlation with numpy_bitmap {np.mean(scores):.3f}")
    assert np.mean(scores) > 0.9


def test_off_centre_small_drawing_is_centred_and_scaled(cats: list) -> None:
    big, ref = cats[0]
    canvas = np.zeros((1000, 700), dtype=np.uint8)
    small = np.asarray(Image.fromarray(big).resize((140, 140)))
    canvas[800:940, 20:160] = small
    out = decode_image(_png(Image.fromarray(canvas)))
    assert _corr(out, ref) > 0.85


def test_blank_image_gives_blank_bitmap() -> None:
    assert decode_image(_png(Image.new("L", (64, 64), 255))).max() == 0


def test_limits_refuse_bytes_pixels_and_bombs() -> None:
    big = _png(Image.new("L", (600, 600), 0))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(big, ImageLimits(max_image_bytes=100))
    assert err.value.field == "max_image_bytes" and "429 bytes, over the limit of max_image_bytes=100" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(big, ImageLimits(max_image_pixels=1000))
    assert err.value.field == "max_image_pixels" and "360000 pixels" in str(err.value)
    # A decompression bomb: a tiny PNG whose header claims 30000x30000 pixels.
    bomb = _bomb_png(30000, 30000)
    assert len(bomb) < 2000
    with pytest.raises(ImageDecodeError) as err:
        decode_image(bomb)
    assert err.value.field == "max_image_pixels" and "limit" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_bomb_png(9000, 10), ImageLimits(max_image_side_px=8192))
    assert err.value.field == "max_image_side_px" and "9000x10" in str(err.value)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a...."])
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data)


@pytest.mark.parametrize(
    "data", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a...."], ids=["text", "png-zeros", "gif"]
)
def test_refusals_are_stable_messages(data: bytes) -> None:
    """The same bytes get the same message: Pillow's own names a BytesIO at a new address every call."""
    messages = set()
    for _ in range(3):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(bytes(data))  # a new object each time, as every request is
        messages.add(str(err.value))
    [message] = messages
    assert " at 0x" not in message and "BytesIO" not in message


@pytest.mark.parametrize(("w", "h"), [(30000, 30000), (100000, 2000)])
def test_pillows_bomb_guard_reports_our_limit(w: int, h: int) -> None:
    """Past twice Pillow's MAX_IMAGE_PIXELS, Pillow refuses at open: the message names our limit, not Pillow's."""
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_bomb_png(w, h), ImageLimits(max_image_side_px=10**6))
    assert err.value.field == "max_image_pixels"
    assert str(err.value) == f"image is {w * h} pixels, over the limit of max_image_pixels={16 * 1024 * 1024}"


def test_truncated_png_is_refused(cats: list) -> None:
    data = _png(Image.fromarray(cats[0][0]))
    with pytest.raises(ImageDecodeError, match=r"corrupt or truncated|not a decodable"):
        decode_image(data[: len(data) // 2])


def _bomb_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + b"\x00" * w
    idat = zlib.compress(row * 8, 9)  # only a few rows: the header alone is the threat
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("pen_px", [3, 6])
def test_thin_pen_canvas_is_thickened_like_googles_strokes(sample: Path, pen_px: int) -> None:
    """A 300x300 browser canvas drawn with a 3-6 px pen: without thickening, correlation was 0.75-0.82."""
    from PIL import ImageDraw

    from doodle import drawing_to_bitmap

    corr = []
    for d in read_ndjson(sample / "simplified" / "cat.ndjson"):
        img = Image.new("RGB", (300, 300), "white")
        draw = ImageDraw.Draw(img)
        for s in d.strokes:
            draw.line([(float(x) + 22, float(y) + 22) for x, y in s[:, :2]], fill="black", width=pen_px, joint="curve")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        got, want = decode_image(buf.getvalue()), drawing_to_bitmap(d)
        corr.append(np.corrcoef(got.ravel().astype(float), want.ravel().astype(float))[0, 1])
    print(f"pen {pen_px}px on a 300px canvas: mean r = {np.mean(corr):.3f} against the stroke rendering")
    assert np.mean(corr) >= 0.86
