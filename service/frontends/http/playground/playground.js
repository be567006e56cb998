// The playground's behaviour: pointer events (mouse, pen, touch) become raw strokes; after every stroke, and
// after an undo, the page sends them to POST v1/classify?bitmaps=true and shows the top 3 guesses and the
// 28x28 image the service rendered. Only the answer to the latest drawing is shown. #guesses carries
// data-state (empty, pending, ok, error) and data-strokes (the strokes its answer is for), for people and tests.
// When the model makes an out-of-class decision (prediction.outOfClass, issue 18) and calls the drawing unknown,
// the page says "I don't know this one" instead of naming a class, and shows the top 3 as the closest ones only;
// #guesses then carries data-known="false" ("true" when known, "" when the model makes no such decision).
"use strict";

(() => {
  const TOP_K = 3;
  const PEN_PX = 4;

  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const seen = document.getElementById("seen");
  const seenCtx = seen.getContext("2d");
  const guesses = document.getElementById("guesses");
  const verdict = document.getElementById("verdict");
  const problem = document.getElementById("problem");
  const undoButton = document.getElementById("undo");
  const clearButton = document.getElementById("clear");
  const modelLine = document.getElementById("model");
  const labelList = document.getElementById("labels");

  /** Finished strokes: {x: [], y: [], t: []}, canvas CSS pixels and ms since the drawing's first point. */
  const strokes = [];
  let current = null;   // the stroke being drawn, and its pointer
  let pointerId = null;
  let startedAt = null; // performance.now() at the drawing's first point
  let sent = 0;         // requests sent; only the answer to the latest one is shown

  // --- drawing ----------------------------------------------------------------------------------------------

  function fitCanvas() {
    const box = pad.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    pad.width = Math.max(1, Math.round(box.width * dpr));
    pad.height = Math.max(1, Math.round(box.height * dpr));
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    redraw();
  }

  function pen() {
    ctx.lineWidth = PEN_PX;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = ctx.fillStyle = "#1d1d1f";
  }

  function paint(stroke) {
    pen();
    if (stroke.x.length === 1) {
      ctx.beginPath();
      ctx.arc(stroke.x[0], stroke.y[0], PEN_PX / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(stroke.x[0], stroke.y[0]);
    for (let i = 1; i < stroke.x.length; i++) ctx.lineTo(stroke.x[i], stroke.y[i]);
    ctx.stroke();
  }

  function redraw() {
    ctx.clearRect(0, 0, pad.width, pad.height);
    strokes.forEach(paint);
    if (current) paint(current);
  }

  function addPoint(event) {
    const box = pad.getBoundingClientRect();
    const now = performance.now();
    if (startedAt === null) startedAt = now;
    current.x.push(Math.round((event.clientX - box.left) * 100) / 100);
    current.y.push(Math.round((event.clientY - box.top) * 100) / 100);
    current.t.push(Math.round(now - startedAt));
  }

  pad.addEventListener("pointerdown", (event) => {
    if (!event.isPrimary || event.button !== 0 || current) return;
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    pointerId = event.pointerId;
    current = { x: [], y: [], t: [] };
    addPoint(event);
    paint(current);
  });

  pad.addEventListener("pointermove", (event) => {
    if (!current || event.pointerId !== pointerId) return;
    const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    const events = coalesced.length ? coalesced : [event];
    const from = current.x.length - 1;
    for (const e of events) addPoint(e);
    pen();
    ctx.beginPath();
    ctx.moveTo(current.x[from], current.y[from]);
    for (let i = from + 1; i < current.x.length; i++) ctx.lineTo(current.x[i], current.y[i]);
    ctx.stroke();
  });

  function endStroke(event) {
    if (!current || event.pointerId !== pointerId) return;
    strokes.push(current);
    current = null;
    pointerId = null;
    updateButtons();
    classify();
  }
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  function undo() {
    if (!strokes.length || current) return;
    strokes.pop();
    if (!strokes.length) startedAt = null;
    redraw();
    updateButtons();
    classify();
  }

  function clear() {
    if (current) return;
    strokes.length = 0;
    startedAt = null;
    redraw();
    updateButtons();
    classify();
  }

  function updateButtons() {
    undoButton.disabled = clearButton.disabled = strokes.length === 0;
  }

  undoButton.addEventListener("click", undo);
  clearButton.addEventListener("click", clear);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    } else if (event.key === "Escape") {
      clear();
    }
  });

  // --- asking the service -------------------------------------------------------------------------------------

  async function classify() {
    const mine = ++sent;
    const count = strokes.length;
    if (count === 0) {
      showEmpty();
      return;
    }
    guesses.dataset.state = "pending";
    const body = {
      drawings: [{
        strokes: {
          coordinates: "RAW",
          strokes: strokes.map((s) => ({ x: s.x, y: s.y, tMs: s.t })),
        },
      }],
      topK: TOP_K,
    };
    let response;
    let answer;
    try {
      response = await fetch("v1/classify?bitmaps=true", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      answer = await response.json();
    } catch (err) {
      if (mine === sent) showProblem({ message: `The service did not answer (${err.message}).` }, count);
      return;
    }
    if (mine !== sent) return; // a newer drawing is already on its way
    if (!response.ok) {
      showProblem(answer.error || { message: `HTTP ${response.status}` }, count);
      return;
    }
    showGuesses(answer.predictions[0], count);
    showSeen(answer.bitmaps[0].pixels);
  }

  function showEmpty() {
    guesses.replaceChildren();
    guesses.dataset.state = "empty";
    guesses.dataset.strokes = "0";
    guesses.dataset.known = "";
    guesses.classList.remove("unknown");
    verdict.textContent = "Draw something…";
    problem.hidden = true;
    seenCtx.clearRect(0, 0, seen.width, seen.height);
    markLabels([]);
  }

  function showGuesses(prediction, count) {
    const top = prediction.top || [];
    const ood = prediction.outOfClass; // absent: the model makes no out-of-class decision
    const unknown = Boolean(ood) && !ood.known;
    const items = top.map((guess) => {
      const item = document.createElement("li");
      item.dataset.label = guess.label;
      item.dataset.score = String(guess.score);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = guess.label;
      label.title = guess.label;
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.className = "fill";
      fill.style.width = `${Math.max(0, Math.min(100, guess.score * 100)).toFixed(1)}%`;
      bar.append(fill);
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${Math.round(guess.score * 100)}%`;
      item.append(label, bar, score);
      return item;
    });
    guesses.replaceChildren(...items);
    guesses.dataset.strokes = String(count);
    guesses.dataset.known = ood ? String(!unknown) : "";
    guesses.classList.toggle("unknown", unknown);
    guesses.title = unknown ? `Not like any class the model knows (known_score ${(ood.score || 0).toFixed(2)} < `
      + `${(ood.threshold || 0).toFixed(2)}); these are only the closest.` : "";
    guesses.dataset.state = "ok";
    problem.hidden = true;
    const best = top[0];
    if (unknown) {
      verdict.textContent = "I don't know this one";
    } else {
      verdict.textContent = !best ? "…" : best.score >= 0.5 ? `I know, it's ${article(best.label)}!`
        : `Is it ${article(best.label)}?`;
    }
    markLabels(unknown ? [] : top.map((g) => g.label));
  }

  function article(label) {
    return /^[aeiou]/i.test(label) ? `an ${label}` : `a ${label}`;
  }

  function showSeen(pixelsBase64) {
    const bytes = Uint8Array.from(atob(pixelsBase64), (c) => c.charCodeAt(0));
    const image = seenCtx.createImageData(28, 28);
    for (let i = 0; i < bytes.length && i < 28 * 28; i++) {
      image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = bytes[i];
      image.data[4 * i + 3] = 255;
    }
    seenCtx.putImageData(image, 0, 0);
  }

  function showProblem(error, count) {
    guesses.replaceChildren();
    guesses.dataset.state = "error";
    guesses.dataset.strokes = String(count);
    verdict.textContent = "Hmm…";
    const title = document.createElement("strong");
    title.textContent = error.message || "Something went wrong.";
    const list = document.createElement("ul");
    for (const detail of error.details || []) {
      for (const v of detail.fieldViolations || []) {
        const item = document.createElement("li");
        item.textContent = v.field ? `${v.field}: ${v.description}` : v.description;
        list.append(item);
      }
    }
    problem.replaceChildren(title, ...(list.children.length ? [list] : []));
    problem.hidden = false;
  }

  // --- the model ------------------------------------------------------------------------------------------------

  function markLabels(top) {
    for (const item of labelList.children) item.classList.toggle("hit", top.includes(item.textContent));
  }

  async function loadModel() {
    try {
      const response = await fetch("v1/model");
      const info = await response.json();
      if (!response.ok) throw new Error(info.error ? info.error.message : `HTTP ${response.status}`);
      const version = info.defaultVersion;
      const others = info.versions.length > 1 ? ` (serving versions ${info.versions.join(", ")})` : "";
      const ood = info.outOfClass ? ` · says "I don't know" below known_score ${info.outOfClass.threshold.toFixed(2)}`
        : "";
      modelLine.textContent = `Model ${info.name} version ${version}${others} · ${info.labels.length} classes · `
        + `${info.backend} backend${ood}`;
      modelLine.dataset.version = String(version);
      labelList.replaceChildren(...info.labels.map((label) => {
        const item = document.createElement("li");
        item.textContent = label;
        return item;
      }));
      document.querySelector("#known summary").textContent = `The ${info.labels.length} classes the model knows`;
    } catch (err) {
      modelLine.textContent = `Waiting for the model (${err.message})…`;
      setTimeout(loadModel, 1000);
    }
  }

  window.addEventListener("resize", fitCanvas);
  fitCanvas();
  showEmpty();
  loadModel();
})();
