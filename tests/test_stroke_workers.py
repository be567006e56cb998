"""Strokes are simplified and rendered in worker processes (``service.preprocess.decode``, ``stroke_render_*``
settings).

- The pool renders exactly what ``doodle`` renders in-process, for real raw and simplified drawings.
- A legal drawing that takes longer than ``stroke_render_budget_ms`` (an 8,192-point raw zigzag across the canvas,
  ~350 ms here) is refused naming the budget, its worker is killed and replaced, and the next drawing renders.
- Through a real gateway process: a call whose drawing overruns the budget gets INVALID_ARGUMENT on
  ``drawings[0].strokes`` naming ``stroke_render_budget_ms``; the other calls answer exactly as the bitmaps
  ``doodle`` renders for them; with ``--stroke-render-workers 0`` (render on the preprocessing threads) the
  answers are the same.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from attack_probe import AttackedGateway
from harness import SHIPPED_MODEL
from test_attacks_images import classify

from doodle import Drawing, drawing_to_bitmap
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions
from service.preprocess.decode import WorkerPool, WorkRefused

SAMPLE = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared" / "quickdraw"))
#: The gateway's budget in these tests: far over a normal drawing's few ms, far under the zigzag's ~350 ms.
BUDGET_MS = 100
KILLED = "stroke render worker"


def zigzag(points: int = 8192) -> list[np.ndarray]:
    """The slowest legal raw drawing found: one stroke zigzagging across the whole coordinate range."""
    x = np.where(np.arange(points) % 2, 1e6, -1e6)
    return [np.stack([x, np.linspace(-1e6, 1e6, points)], axis=1)]


def real_drawings(n: int = 12) -> list[tuple[list[np.ndarray], bool]]:
    """Real raw and simplified drawings from the sample (strokes as (k, 2) arrays, raw flag)."""
    out: list[tuple[list[np.ndarray], bool]] = []
    for sub, raw in (("raw", True), ("simplified", False)):
        path = SAMPLE / sub / "octopus.ndjson"
        if not path.exists():
            continue
        with open(path) as fh:
            for _, line in zip(range(n // 2), fh, strict=False):
                strokes = json.loads(line)["drawing"]
                out.append(([np.asarray(s[:2], np.float64).T for s in strokes], raw))
    if not out:
        out = [([np.array([[20.0, 20.0], [235.0, 20.0], [235.0, 235.0]])], False)]
    return out


def flat(strokes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat x, y and per-stroke counts, as the gateway's validated drawing holds them."""
    return (np.concatenate([s[:, 0] for s in strokes]), np.concatenate([s[:, 1] for s in strokes]),
            np.asarray([len(s) for s in strokes], np.int64))  # fmt: skip


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    p = WorkerPool(1, BUDGET_MS, "stroke_render")
    p.start()
    yield p
    p.close()


def test_workers_render_what_doodle_renders(pool: WorkerPool) -> None:
    drawings = real_drawings()
    for strokes, raw in drawings:
        local = drawing_to_bitmap(Drawing(word="", strokes=tuple(strokes), raw=raw))
        assert np.array_equal(pool.render(*flat(strokes), raw), local)
    print(f"[render] {len(drawings)} real drawings rendered in a worker equal doodle's in-process bitmaps")


def test_an_overrun_is_refused_naming_the_budget_and_the_worker_replaced(pool: WorkerPool) -> None:
    t0 = time.perf_counter()
    drawing_to_bitmap(Drawing(word="", strokes=tuple(zigzag()), raw=True))
    local_s = time.perf_counter() - t0
    assert local_s > 2 * BUDGET_MS / 1000, f"the zigzag renders in {local_s * 1000:.0f} ms here: not slow enough"
    t0 = time.perf_counter()
    with pytest.raises(WorkRefused) as exc:
        pool.render(*flat(zigzag()), True)
    waited_s = time.perf_counter() - t0
    assert exc.value.field == "stroke_render_budget_ms"
    assert exc.value.reason == f"rendering took longer than stroke_render_budget_ms={BUDGET_MS}"
    assert waited_s < BUDGET_MS / 1000 + 0.5, waited_s
    assert pool.replaced >= 1
    strokes, raw = real_drawings()[0]
    # The replacement starts in the background; the next render waits for it within the budget.
    deadline = time.monotonic() + 10
    while True:
        try:
            out = pool.render(*flat(strokes), raw)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert np.array_equal(out, drawing_to_bitmap(Drawing(word="", strokes=tuple(strokes), raw=raw)))


def stroke_drawing(strokes: list[np.ndarray], raw: bool) -> pb.Drawing:
    """The Classify form of a drawing."""
    coords = pb.Strokes.RAW if raw else pb.Strokes.SIMPLIFIED
    return pb.Drawing(strokes=pb.Strokes(coordinates=coords,
                                         strokes=[pb.Stroke(x=s[:, 0].tolist(), y=s[:, 1].tolist()) for s in strokes]))


def bitmap_drawing(strokes: list[np.ndarray], raw: bool) -> pb.Drawing:
    """The same drawing rendered here by doodle, sent as a bitmap."""
    pixels = drawing_to_bitmap(Drawing(word="", strokes=tuple(strokes), raw=raw))
    return pb.Drawing(bitmap=pb.Bitmap(pixels=pixels.tobytes()))


@pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")
@pytest.mark.parametrize("workers", [2, 0])
def test_gateway_renders_strokes_in_workers_under_the_budget(workers: int) -> None:
    g = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--stroke-render-budget-ms", str(BUDGET_MS),
                        "--stroke-render-workers", str(workers))  # fmt: skip
    try:
        with grpc.insecure_channel(g.target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            for strokes, raw in real_drawings():
                got = classify(stub, stroke_drawing(strokes, raw), timeout_s=30)
                want = classify(stub, bitmap_drawing(strokes, raw), timeout_s=30)
                assert got.code == want.code == grpc.StatusCode.OK, (got, want)
                assert got.response.predictions == want.response.predictions
            if not workers:
                return  # no budget on the preprocessing threads: the zigzag renders there, however long it takes
            slow = classify(stub, stroke_drawing(zigzag(), True), timeout_s=30)
            assert slow.code == grpc.StatusCode.INVALID_ARGUMENT, slow
            assert slow.violations == [
                ("drawings[0].strokes", f"rendering took longer than stroke_render_budget_ms={BUDGET_MS}")
            ], slow
            assert slow.elapsed_s < 2.0, slow
            deadline = time.monotonic() + 10
            while KILLED not in g.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert f"killed (over stroke_render_budget_ms={BUDGET_MS}" in g.output(), g.output()[-3000:]
            strokes, raw = real_drawings()[0]
            after = classify(stub, stroke_drawing(strokes, raw), timeout_s=30)
            assert after.code == grpc.StatusCode.OK, after
            print(f"[render] gateway: zigzag refused in {slow.elapsed_s * 1000:.0f} ms naming "
                  "stroke_render_budget_ms; worker replaced; next drawing OK")  # fmt: skip
    finally:
        g.kill()
