"""The playground in a real browser: Debian's Chromium, driven by Playwright, against the gateway's own page.

Real mouse events replay a cat from ``../shared/quickdraw/simplified`` scaled to the canvas; after every
stroke the page must show fresh guesses, and at the end "cat" must be in its top 3. The 28x28 preview must
hold exactly what the server rendered from the strokes the page sent. An empty page, a single dot, undo,
clear and a finger on a touch screen must all leave the page working, with no script errors. The screenshot
lands in ``test-artifacts/playground.png``. With a model that makes an out-of-class decision (issue 18; the
``known_model`` fixture, tests/known_models.py), a line across the canvas gets "I don't know this one" and the cat
is named (screenshot ``test-artifacts/playground-unknown.png``).

Nothing downloads a browser: ``make test`` first runs ``make browser``, which installs Debian's chromium with
apt-get when it is missing (as root); without it, or without Playwright, these tests skip and say why.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT
from google.protobuf import json_format
from harness import SHIPPED_MODEL, RunningGateway

from doodle.formats import read_ndjson
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import find_versions
from service.preprocess.validation import Limits, render, validate

CHROMIUM = Path(os.environ.get("QUICKDRAW_CHROMIUM", "/usr/bin/chromium"))
#: Playwright adds --headless itself; the rest keep Chromium off the (closed) network and out of the sandbox
#: it cannot create as root.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"
WORD = "cat"
MARGIN = 0.1  # of the canvas, left free around the replayed drawing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM}: `make browser` installs it with apt-get "
                    "(as root); QUICKDRAW_CHROMIUM names another binary")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with RunningGateway(warmup=False) as gw:
        yield gw


@pytest.fixture()
def page(browser: Any, gateway: RunningGateway) -> Iterator[Any]:
    """The playground, loaded and showing the model; script errors and classify bodies are recorded."""
    pg = open_page(browser, gateway)
    try:
        yield pg
    finally:
        pg.context.close()


def open_page(browser: Any, gw: RunningGateway) -> Any:
    """The playground of ``gw``, loaded and showing the model; script errors and classify bodies are recorded."""
    context = browser.new_context(viewport={"width": 1100, "height": 820}, device_scale_factor=1)
    pg = context.new_page()
    pg.errors = []  # type: ignore[attr-defined]
    pg.sent = []  # type: ignore[attr-defined]
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))  # type: ignore[attr-defined]
    pg.on("console", lambda msg: pg.errors.append(msg.text) if msg.type == "error" else None)  # type: ignore[attr-defined]
    pg.on("request", lambda req: pg.sent.append(req.post_data_json) if "/v1/classify" in req.url else None)  # type: ignore[attr-defined]
    pg.goto(f"http://127.0.0.1:{gw.app.http_port}/")
    pg.wait_for_selector("#model[data-version]")
    return pg


def guesses(page: Any) -> list[str]:
    return page.eval_on_selector_all("#guesses li", "items => items.map(i => i.dataset.label)")


def wait_for_answer(page: Any, strokes: int, state: str = "ok") -> None:
    page.wait_for_function(
        "([n, s]) => { const g = document.querySelector('#guesses'); return g.dataset.strokes === String(n) "
        "&& g.dataset.state === s; }",
        arg=[strokes, state],
        timeout=30_000,
    )


def seen_pixels(page: Any) -> np.ndarray:
    """The preview canvas's 28x28 pixels (red channel; it is grey)."""
    data = page.evaluate(
        "() => Array.from(document.querySelector('#seen').getContext('2d').getImageData(0, 0, 28, 28).data)"
    )
    return np.asarray(data, np.uint8).reshape(28, 28, 4)[:, :, 0]


def server_rendering(body: dict[str, Any]) -> np.ndarray:
    """What the service renders for a request body the page sent: the gateway's own validate and render."""
    valid = validate(json_format.ParseDict(body, pb.ClassifyRequest()), Limits())
    return render(0, valid.drawings[0], Limits())


def canvas_box(page: Any) -> dict[str, float]:
    return page.locator("#pad").bounding_box()


def replay(page: Any, strokes: list[list[list[float]]]) -> None:
    """Draw simplified strokes (0..255) on the canvas with real mouse events, waiting for each stroke's answer."""
    box = canvas_box(page)
    side = min(box["width"], box["height"])
    scale = side * (1 - 2 * MARGIN) / 255
    x0, y0 = box["x"] + side * MARGIN, box["y"] + side * MARGIN
    for n, (xs, ys, *_) in enumerate(strokes, start=1):
        points = [(x0 + x * scale, y0 + y * scale) for x, y in zip(xs, ys, strict=True)]
        page.mouse.move(*points[0])
        page.mouse.down()
        for x, y in points[1:]:
            page.mouse.move(x, y, steps=3)
        page.mouse.up()
        wait_for_answer(page, n)  # live: every stroke gets its own answer
        assert len(guesses(page)) == 3


def test_draws_a_cat_and_the_page_guesses_it(page: Any, sample: Path) -> None:
    drawing = next(read_ndjson(sample / "simplified" / f"{WORD}.ndjson"))
    strokes = drawing.google_strokes()
    replay(page, strokes)

    top3 = guesses(page)
    scores = page.eval_on_selector_all("#guesses li", "items => items.map(i => Number(i.dataset.score))")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True, animations="disabled")
    (ARTIFACTS / "playground.json").write_text(json.dumps({"word": WORD, "top3": top3, "scores": scores}) + "\n")
    assert WORD in top3, f"the page's top 3 for a replayed {WORD}: {list(zip(top3, scores, strict=True))}"
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert page.text_content("#verdict") not in ("", "Draw something…")

    # The preview is exactly the server's rendering of what the page sent, and looks like a drawing.
    last = page.sent[-1]
    assert last["drawings"][0]["strokes"]["coordinates"] == "RAW"
    assert len(last["drawings"][0]["strokes"]["strokes"]) == len(strokes)
    pixels = seen_pixels(page)
    np.testing.assert_array_equal(pixels, server_rendering(last))
    assert 40 < np.count_nonzero(pixels) < 500

    # The labels the model knows, with the top 3 marked.
    labels = page.eval_on_selector_all("#labels li", "items => items.map(i => i.textContent)")
    assert len(labels) == 29 and WORD in labels
    assert sorted(page.eval_on_selector_all("#labels li.hit", "items => items.map(i => i.textContent)")) == sorted(
        top3
    )

    # Undo asks again for one stroke fewer; clear empties everything.
    page.click("#undo")
    wait_for_answer(page, len(strokes) - 1)
    assert len(page.sent[-1]["drawings"][0]["strokes"]["strokes"]) == len(strokes) - 1
    page.keyboard.press("Control+z")
    wait_for_answer(page, len(strokes) - 2)
    page.click("#clear")
    wait_for_answer(page, 0, "empty")
    assert guesses(page) == [] and not seen_pixels(page).any()
    assert page.is_disabled("#undo") and page.is_disabled("#clear")
    assert page.errors == []  # type: ignore[attr-defined]


def test_nothing_then_a_single_dot(page: Any) -> None:
    # Nothing drawn: no request, no guesses, the buttons off, and the keys do nothing harmful.
    assert page.get_attribute("#guesses", "data-state") == "empty" and guesses(page) == []
    assert page.is_disabled("#undo") and page.is_disabled("#clear")
    page.keyboard.press("Control+z")
    page.keyboard.press("Escape")
    box = canvas_box(page)
    page.mouse.move(box["x"] + box["width"] + 40, box["y"] + 20)  # a click beside the canvas draws nothing
    page.mouse.down()
    page.mouse.up()
    page.wait_for_timeout(300)
    assert page.sent == [] and page.get_attribute("#guesses", "data-state") == "empty"  # type: ignore[attr-defined]

    # A single dot: one point, a real answer, a few pixels in the preview.
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 3)
    wait_for_answer(page, 1)
    [body] = page.sent  # type: ignore[attr-defined]
    [stroke] = body["drawings"][0]["strokes"]["strokes"]
    assert len(stroke["x"]) == len(stroke["y"]) == 1
    assert len(guesses(page)) == 3
    pixels = seen_pixels(page)
    np.testing.assert_array_equal(pixels, server_rendering(body))
    assert 0 < np.count_nonzero(pixels) < 20

    page.keyboard.press("Escape")
    wait_for_answer(page, 0, "empty")
    assert page.errors == []  # type: ignore[attr-defined]


def test_a_finger_and_a_pen_draw_too(browser: Any, gateway: RunningGateway) -> None:
    context = browser.new_context(viewport={"width": 420, "height": 800}, has_touch=True, is_mobile=True)
    try:
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(f"http://127.0.0.1:{gateway.app.http_port}/")
        pg.wait_for_selector("#model[data-version]")
        box = pg.locator("#pad").bounding_box()
        cdp = context.new_cdp_session(pg)
        cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"] / 3
        ring = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 40)]
        for i, (x, y) in enumerate(ring):  # a finger: a circle
            kind = "touchStart" if i == 0 else "touchMove"
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        wait_for_answer(pg, 1)
        assert len(guesses(pg)) == 3
        assert pg.evaluate("() => window.scrollY") == 0  # the finger drew; it did not scroll the page
        for i, x in enumerate(np.linspace(cx - r / 2, cx + r / 2, 12)):  # a pen: a line across it
            kind = "mousePressed" if i == 0 else "mouseMoved"
            cdp.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": cy, "pointerType": "pen",
                                                  "button": "left", "buttons": 1, "clickCount": 1})
        cdp.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": cx + r / 2, "y": cy,
                                              "pointerType": "pen", "button": "left", "clickCount": 1})
        wait_for_answer(pg, 2)
        assert len(guesses(pg)) == 3
        assert errors == []
    finally:
        context.close()


def test_the_page_says_when_it_does_not_know_the_drawing(browser: Any, known_model: Path, sample: Path) -> None:
    """A model with an out-of-class decision: a line across the canvas is not like any of its classes (its
    known_score, offline, is under the fixture's threshold), so the page says "I don't know this one" and names no
    class; the cat is known and named as before. The decision shown is the offline model's for what the page sent."""
    from known_models import THRESHOLD, offline_outputs

    with RunningGateway(model_dir=known_model, warmup=False) as gw:
        pg = open_page(browser, gw)
        try:
            assert "I don't know" in pg.text_content("#model")  # the model line says it can tell
            box = canvas_box(pg)
            y = box["y"] + box["height"] / 2
            pg.mouse.move(box["x"] + box["width"] * 0.15, y)
            pg.mouse.down()
            pg.mouse.move(box["x"] + box["width"] * 0.85, y, steps=12)
            pg.mouse.up()
            wait_for_answer(pg, 1)
            line = server_rendering(pg.sent[-1])
            score = float(offline_outputs(known_model / "1", line[None, :, :, None])["known_score"][0])
            assert score < THRESHOLD, f"the line's known_score {score:.3f} is not under the fixture's {THRESHOLD}"
            assert pg.get_attribute("#guesses", "data-known") == "false"
            assert pg.text_content("#verdict") == "I don't know this one"
            assert len(guesses(pg)) == 3  # the closest classes, still shown
            assert pg.eval_on_selector_all("#labels li.hit", "items => items.length") == 0  # none named
            ARTIFACTS.mkdir(exist_ok=True)
            pg.screenshot(path=str(ARTIFACTS / "playground-unknown.png"), full_page=True, animations="disabled")

            pg.keyboard.press("Escape")
            wait_for_answer(pg, 0, "empty")
            assert pg.get_attribute("#guesses", "data-known") == ""
            replay(pg, next(read_ndjson(sample / "simplified" / f"{WORD}.ndjson")).google_strokes())
            cat = server_rendering(pg.sent[-1])
            score = float(offline_outputs(known_model / "1", cat[None, :, :, None])["known_score"][0])
            assert score >= THRESHOLD, f"the cat's known_score {score:.3f} is under the fixture's {THRESHOLD}"
            assert pg.get_attribute("#guesses", "data-known") == "true"
            assert pg.text_content("#verdict") != "I don't know this one" and WORD in guesses(pg)
            assert pg.errors == []  # type: ignore[attr-defined]
        finally:
            pg.context.close()
