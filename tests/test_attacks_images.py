"""Security finding 4, image decoding cost, measured against a real gateway process (``quickdraw serve``).

- A progressive JPEG with 8,000 appended refinement scans (7 s of CPU to decode before) is refused before decoding,
  naming ``max_jpeg_scans``.
- A legal image that is slow to decode (2048 x 2048, 32 scans, 4:4:4) overruns the decode budget: the caller gets
  INVALID_ARGUMENT naming ``image_decode_budget_ms``, the worker process is killed and replaced, the next image
  decodes, and while two such decodes run a 3-point strokes call still answers promptly. The module's gateway runs
  with a small budget (``BUDGET_MS``) so that this image overruns it for sure; the other cases are refused before
  any decoding and do not depend on it.
- A 2 KB 4096 x 4096 palette PNG is refused by ``max_image_pixels`` (4 Mi by default) from its header.
- Normal PNG and JPEG images classify exactly as the pixels ``doodle.decode_image`` gives for them.

Each attack is measured with ``attack_probe.measured`` (health latency throughout, RSS growth, gateway CPU).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from attack_probe import AttackedGateway, measured
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import SHIPPED_MODEL
from PIL import Image, ImageDraw

from doodle import decode_image
from doodle.image import jpeg_scans
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions
from service.settings import Settings

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)

#: The module gateway's decode budget: far under the slow image's ~100 ms, far over a normal image's few ms.
BUDGET_MS = 40
FIELD = "drawings[0].image.data"
#: What the gateway logs when it kills a decode worker.
KILLED = "killed (over image_decode_budget_ms"


@dataclass
class Answer:
    """How a Classify call ended."""

    code: grpc.StatusCode
    violations: list[tuple[str, str]]
    elapsed_s: float
    response: pb.ClassifyResponse | None = None


def classify(stub: pb_grpc.ClassifierStub, *drawings: pb.Drawing, timeout_s: float = 10.0) -> Answer:
    """One Classify call, its outcome and latency."""
    t0 = time.perf_counter()
    try:
        resp = stub.Classify(pb.ClassifyRequest(drawings=list(drawings)), timeout=timeout_s)
        return Answer(grpc.StatusCode.OK, [], time.perf_counter() - t0, resp)
    except grpc.RpcError as exc:
        elapsed = time.perf_counter() - t0
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
        out = []
        for detail in status.details if status else []:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                out += [(v.field, v.description) for v in bad.field_violations]
        return Answer(exc.code(), out, elapsed)  # type: ignore[attr-defined]


def image(data: bytes) -> pb.Drawing:
    """An image drawing."""
    return pb.Drawing(image=pb.EncodedImage(data=data))


def strokes_3() -> pb.Drawing:
    """A 3-point stroke drawing."""
    return pb.Drawing(strokes=pb.Strokes(strokes=[pb.Stroke(x=[10, 120, 240], y=[20, 200, 30])]))


def doodle_png(side: int = 280, fmt: str = "PNG", seed: int = 0) -> bytes:
    """A dark-on-white drawing as a phone or canvas would send it."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (side, side), 255)
    pts = [tuple(int(v) for v in p) for p in rng.integers(side // 8, side * 7 // 8, (6, 2))]
    ImageDraw.Draw(img).line(pts, fill=0, width=max(2, side // 40))
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=90)
    return buf.getvalue()


def with_scans(jpeg: bytes, total: int) -> bytes:
    """A progressive JPEG with copies of its last (refinement) scan appended before EOI, to ``total`` scans."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * (total - jpeg.count(b"\xff\xda")) + b"\xff\xd9"


def scan_bomb() -> bytes:
    """The finding's JPEG: progressive, with 8,000 copies of its refinement scan appended (about 320 KB)."""
    pixels = np.full((256, 256, 3), 255, np.uint8)
    pixels[64:192, 125:131] = 0  # a stroke
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", progressive=True, quality=90)
    return with_scans(buf.getvalue(), buf.getvalue().count(b"\xff\xda") + 8000)


def slow_jpeg() -> bytes:
    """A legal JPEG that is slow to decode: 2048 x 2048 (max_image_pixels), 4:4:4, 32 scans (max_jpeg_scans)."""
    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048), (120, 121, 122)).save(buf, format="JPEG", progressive=True, quality=95,
                                                          subsampling=0)  # fmt: skip
    return with_scans(buf.getvalue(), Settings.model_fields["max_jpeg_scans"].default)


def palette_bomb() -> bytes:
    """A 4096 x 4096 palette PNG of about 2 KB."""
    buf = io.BytesIO()
    Image.new("P", (4096, 4096), 0).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gw() -> Iterator[AttackedGateway]:
    """One gateway process for the module, warmed up with normal calls; it must then stop cleanly on SIGTERM."""
    g = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--image-decode-budget-ms", str(BUDGET_MS))
    try:
        with grpc.insecure_channel(g.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for i in range(3):
                for d in (image(doodle_png(seed=i)), image(doodle_png(fmt="JPEG", seed=i)), strokes_3()):
                    assert classify(stub, d).code == grpc.StatusCode.OK, g.output()[-3000:]
        yield g
        t0 = time.monotonic()
        assert g.terminate() == 0, g.output()[-3000:]
        assert time.monotonic() - t0 < 15, "the gateway (and its decode workers) took too long to stop"
    finally:
        g.kill()


@pytest.fixture
def stub(gw: AttackedGateway) -> Iterator[pb_grpc.ClassifierStub]:
    """A Classifier stub on its own channel."""
    with grpc.insecure_channel(gw.target) as ch:
        yield pb_grpc.ClassifierStub(ch)


def test_jpeg_with_8000_scans_is_refused_before_decoding(gw: AttackedGateway, stub: pb_grpc.ClassifierStub) -> None:
    data = scan_bomb()
    assert 250_000 < len(data) < 2 * 1024 * 1024 and data.count(b"\xff\xda") > 8000
    n = 5
    with measured(gw, "jpeg with 8000 refinement scans", requests=n) as cost:
        answers = [classify(stub, image(data)) for _ in range(n)]
    for a in answers:
        assert a.code == grpc.StatusCode.INVALID_ARGUMENT, a
        [(field, text)] = a.violations
        assert field == FIELD and "max_jpeg_scans=32" in text, a.violations
        assert a.elapsed_s < 1.0, a
    cost.assert_bounds()


def test_palette_png_4096_is_refused_by_the_pixel_limit(gw: AttackedGateway, stub: pb_grpc.ClassifierStub) -> None:
    data = palette_bomb()
    assert len(data) < 3000 and Image.open(io.BytesIO(data)).size == (4096, 4096)
    n = 20
    with measured(gw, "4096x4096 palette png", requests=n) as cost:
        answers = [classify(stub, image(data)) for _ in range(n)]
    for a in answers:
        assert a.code == grpc.StatusCode.INVALID_ARGUMENT, a
        [(field, text)] = a.violations
        assert field == FIELD and "over the limit of max_image_pixels=4194304" in text, a.violations
    cost.assert_bounds()


def test_slow_image_overruns_the_budget_and_strokes_stay_prompt(
    gw: AttackedGateway, stub: pb_grpc.ClassifierStub
) -> None:
    data = slow_jpeg()
    assert len(data) < 2 * 1024 * 1024 and data.count(b"\xff\xda") == 32
    t0 = time.perf_counter()
    decode_image(data)
    local_s = time.perf_counter() - t0
    assert local_s > 2 * BUDGET_MS / 1000, f"the slow image decodes in {local_s * 1000:.0f} ms here: not slow enough"
    killed_before = gw.output().count(KILLED)
    rounds, slow_answers, stroke_answers = 3, [], []
    with measured(gw, f"slow legal jpeg, budget {BUDGET_MS} ms", requests=2 * rounds) as cost, \
            ThreadPoolExecutor(2) as pool:  # fmt: skip
        for _ in range(rounds):
            slow = [pool.submit(classify, stub, image(data)) for _ in range(2)]
            time.sleep(0.005)  # both slow decodes hold the two preprocessing threads
            stroke_answers.append(classify(stub, strokes_3()))
            slow_answers += [f.result() for f in slow]
            time.sleep(0.1)  # the killed workers' replacements start
    for a in slow_answers:
        assert a.code == grpc.StatusCode.INVALID_ARGUMENT, a
        assert a.violations == [(FIELD, f"decoding took longer than image_decode_budget_ms={BUDGET_MS}")], a
        assert a.elapsed_s < 1.0, a
    worst = max(a.elapsed_s for a in stroke_answers)
    print(f"[attack] strokes while two slow decodes ran: worst {worst * 1000:.0f} ms; slow calls worst "
          f"{max(a.elapsed_s for a in slow_answers) * 1000:.0f} ms; local decode {local_s * 1000:.0f} ms")  # fmt: skip
    assert all(a.code == grpc.StatusCode.OK for a in stroke_answers), stroke_answers
    assert worst < 0.5, stroke_answers
    cost.assert_bounds()
    # Every overrunning worker was killed and replaced, and the next image is decoded as ever.
    killed = gw.output().count(KILLED) - killed_before
    assert killed == len(slow_answers), gw.output()[-3000:]
    after = classify(stub, image(doodle_png(seed=7)))
    assert after.code == grpc.StatusCode.OK, after


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_normal_images_classify_as_their_decoded_pixels(stub: pb_grpc.ClassifierStub, fmt: str) -> None:
    """The image and the bitmap doodle.decode_image makes of it get identical answers: the same pixels.

    These images decode in ~1 ms, 40x under the module gateway's small budget; but a worker that a busy 2-core
    machine does not schedule for 40 ms overruns it all the same. Such a refusal names the budget, so it is told
    apart and the call asked again (twice at most, and printed): what this test checks is the answer, not the
    machine's scheduling (the budget itself is tested with the slow image above)."""
    budget = f"decoding took longer than image_decode_budget_ms={BUDGET_MS}"
    for seed in range(3):
        data = doodle_png(side=560, fmt=fmt, seed=seed)
        bitmap = pb.Drawing(bitmap=pb.Bitmap(pixels=decode_image(data).tobytes()))
        a = classify(stub, image(data), bitmap)
        for _ in range(2):
            if a.violations != [(FIELD, budget)]:
                break
            print(f"[attack] a {fmt} of 560 px overran the {BUDGET_MS} ms budget on a busy machine; asked again")
            a = classify(stub, image(data), bitmap)
        assert a.code == grpc.StatusCode.OK and a.response is not None, a
        via_image, via_bitmap = a.response.predictions
        assert via_image == via_bitmap


@pytest.mark.parametrize("progressive", [False, True])
def test_scans_are_counted_by_walking_the_markers(progressive: bool) -> None:
    """jpeg_scans agrees with a count of SOS markers, skips entropy-coded data, and stops past its limit."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(doodle_png(300))).convert("RGB").save(buf, format="JPEG", progressive=progressive)
    data = buf.getvalue()
    assert jpeg_scans(data, 32) == data.count(b"\xff\xda") == (10 if progressive else 1)
    assert jpeg_scans(scan_bomb(), 32) == 33
