"""Write deploy/prometheus/tests/model-health.test.yml: promtool tests of the model-health alerts, on real answers.

The shipped model (models/quickdraw, its highest version) classifies the validation drawings its card records,
three ways: as they are (the validation mix: silent), inverted (dark strokes on a light background, as a client
sending bitmaps the wrong way round would: QuickdrawPredictionDrift and QuickdrawOutOfClassRateHigh fire), and
one class only (cat: the drift alert fires). Each minute, two gateway pods (even and odd drawings) count those
answers as the gateway does (service.core.modelhealth: top-1 class, top-1 probability, known_score, out-of-class,
ink), and export the card's reference (the quickdraw_model_reference_* gauges): so the test's input series are what
the model really answers, and tests/test_deploy.py runs promtool on them without TensorFlow.

    python scripts/gen_drift_tests.py            # rewrite the test file (loads TensorFlow: ~15 s)
    python scripts/gen_drift_tests.py --check    # exit 1 when the file differs from what it would write
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from doodle.contract import MODEL_CARD_DISTRIBUTION  # noqa: E402

OUT = ROOT / "deploy" / "prometheus" / "tests" / "model-health.test.yml"
MODEL = ROOT / "models" / "quickdraw"
ONE_CLASS = "cat"
PODS = ("gw-0", "gw-1")
#: Minutes of input (the rules look an hour back; the alerts wait 15 minutes: silent at 10m, firing at 2h).
MINUTES = 120
EPS = 1e-6
JOB = 'namespace="quickdraw",job="quickdraw-gateway"'


def answers(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """What the gateway counts for each drawing: top-1 class and probability, known score, ink pixels."""
    probs, known = model.predict_with_score(images)
    return {
        "top": probs.argmax(axis=1),
        "p": probs.max(axis=1).astype(np.float64),
        "known": known.astype(np.float64),
        "ink": np.count_nonzero(images.reshape(len(images), -1), axis=1),
    }


def js(p: np.ndarray, q: np.ndarray) -> float:
    """The recording rule's Jensen-Shannon divergence (nats, EPS added to every share)."""
    m = (p + q) / 2
    return float(0.5 * np.sum((p + EPS) * np.log((p + EPS) / (m + EPS)) + (q + EPS) * np.log((q + EPS) / (m + EPS))))


def series(name: str, labels: str, per_minute: float) -> list[str]:
    """A counter growing by ``per_minute`` each minute."""
    return [f"      - series: '{name}{{{labels}}}'", f"        values: '0+{per_minute:g}x{MINUTES}'"]


def gauge(name: str, labels: str, value: float) -> list[str]:
    """A gauge held at ``value`` (repr: every digit, as the gateway exports it)."""
    return [f"      - series: '{name}{{{labels}}}'", f"        values: '{value!r}x{MINUTES}'"]


def scenario(
    name: str, a: dict[str, np.ndarray], labels: list[str], card: dict[str, Any], threshold: float, version: str,
    share_ref: np.ndarray, fires: dict[str, bool],
) -> tuple[list[str], dict[str, float]]:
    """One promtool test: the drawings of ``a`` answered once a minute, split over the pods."""
    out = [f"  - name: \"{name}\"", "    interval: 1m", "    input_series:"]
    for i, pod in enumerate(PODS):
        rows = np.arange(i, len(a["top"]), len(PODS))
        lab = f'{JOB},pod="{pod}",version="{version}"'
        counts = np.bincount(a["top"][rows], minlength=len(labels))
        for label, c in zip(labels, counts, strict=True):
            out += series("quickdraw_predictions_total", f'{lab},class="{label}"', int(c))
        out += series("quickdraw_top1_probability_sum", lab, round(float(a["p"][rows].sum()), 4))
        out += series("quickdraw_top1_probability_count", lab, len(rows))
        out += series("quickdraw_known_score_count", lab, len(rows))
        out += series("quickdraw_out_of_class_total", lab, int((a["known"][rows] < threshold).sum()))
        out += series("quickdraw_ink_fraction_sum", lab, round(float(a["ink"][rows].sum()) / 784, 4))
        out += series("quickdraw_ink_fraction_count", lab, len(rows))
        for label, share in zip(labels, share_ref, strict=True):
            out += gauge("quickdraw_model_reference_class_share", f'{lab},class="{label}"', float(share))
        out += gauge("quickdraw_model_reference_ink_fraction_mean", lab, card["ink_fraction"]["mean"])
        out += gauge("quickdraw_model_reference_out_of_class_ratio", lab, card["out_of_class_rate"])
    share = np.bincount(a["top"], minlength=len(labels)) / len(a["top"])
    stats = {
        "js": js(share, share_ref),
        "ooc": float((a["known"] < threshold).mean()),
        "ink": float(a["ink"].mean() / 784),
        "top1": float(a["p"].mean()),
    }
    out.append("    alert_rule_test:")
    for alert, fire in fires.items():
        out += ["      - eval_time: 10m", f"        alertname: {alert}", "        exp_alerts: []"]
        out += ["      - eval_time: 2h", f"        alertname: {alert}"]
        if not fire:
            out.append("        exp_alerts: []")
            continue
        out += ["        exp_alerts:",
                f"          - exp_labels: {{severity: ticket, namespace: quickdraw, job: quickdraw-gateway, "
                f"version: \"{version}\"}}"]  # fmt: skip
        out += ["            exp_annotations:", *annotations(alert, version, stats)]
    return out, stats


def annotations(alert: str, version: str, stats: dict[str, float]) -> list[str]:
    """The alert's annotations as Prometheus renders them for these answers."""
    if alert == "QuickdrawPredictionDrift":
        summary = (f"quickdraw/quickdraw-gateway: model version {version} answers unlike its validation split: "
                   f"class-mix divergence {stats['js']:.3f} (threshold 0.1), or ink fraction off by over 0.15")
        description = ("The last hour's top-1 class mix (Jensen-Shannon divergence from the model card's), or the "
                       "drawings' mean ink fraction, has drifted from what the model saw at export: one class flooding "
                       "in, a client sending inverted or otherwise mis-rendered drawings, or a change in who draws. "
                       "See the dashboard's model health row.")
    else:
        summary = (f"quickdraw/quickdraw-gateway: model version {version} called {humanize_percentage(stats['ooc'])} "
                   "of the last hour's drawings out-of-class (threshold: 20 points over its validation rate)")
        description = ("Far more drawings than on the validation split score under the version's known_score "
                       "threshold: drawings of classes the model does not know, or drawings it cannot read (inverted, "
                       "blank, noise).")
    return [f'              summary: "{summary}"', f'              description: "{description}"',
            f'              runbook_url: "https://quickdraw.example.com/runbooks/#{alert.lower()}"']  # fmt: skip


def humanize_percentage(x: float) -> str:
    """Prometheus's humanizePercentage: 4 significant digits (Go's %.4g), then %."""
    v = x * 100
    digits = 4 - 1 - math.floor(math.log10(abs(v))) if v else 0
    text = f"{v:.{max(digits, 0)}f}".rstrip("0").rstrip(".") if "." in f"{v:.{max(digits, 0)}f}" else f"{v:.0f}"
    return f"{text}%"


def render() -> str:
    """The test file (see the module)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from trainer.card import split_spec
    from trainer.data import BitmapData, Split
    from trainer.evaluate import LoadedModel

    model = LoadedModel(MODEL)
    card = model.card[MODEL_CARD_DISTRIBUTION]
    threshold = model.threshold
    assert threshold is not None, "the shipped model makes no out-of-class decision"
    labels = model.labels
    data_dir = Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))
    data = BitmapData.from_dir(data_dir, labels, split_spec(model.card))
    classes, rows = data.index(Split.VAL)
    images = data.gather(classes, rows)
    counts = np.array([card["top1_class"][label] for label in labels], np.float64)
    share_ref = counts / counts.sum()
    version = str(model.version)
    one = classes == labels.index(ONE_CLASS)
    cases = [
        ("the validation mix stays silent (the validation drawings, as the model answers them)", images,
         {"QuickdrawPredictionDrift": False, "QuickdrawOutOfClassRateHigh": False}),
        (f"one class only ({ONE_CLASS}: its validation drawings) fires the drift alert", images[one],
         {"QuickdrawPredictionDrift": True, "QuickdrawOutOfClassRateHigh": False}),
        ("inverted bitmaps (the validation drawings, dark strokes on a light background) fire both", 255 - images,
         {"QuickdrawPredictionDrift": True, "QuickdrawOutOfClassRateHigh": True}),
    ]  # fmt: skip
    body, notes = [], []
    for name, x, fires in cases:
        lines, stats = scenario(name, answers(model, x), labels, card, threshold, version, share_ref, fires)
        body += [*lines, ""]
        notes.append(f"#   {name.split(' (')[0]}: {len(x)} drawings a minute; class-mix JS {stats['js']:.3f}, "
                     f"out-of-class {stats['ooc']:.3f}, ink fraction {stats['ink']:.3f}, top-1 probability "
                     f"{stats['top1']:.3f}")
    head = [
        "# Generated by scripts/gen_drift_tests.py from the shipped model's answers on real drawings: do not edit.",
        "# promtool tests of the model-health alerts (rules/quickdraw-alerts.yml), through the recording rules:",
        "#   promtool test rules deploy/prometheus/tests/model-health.test.yml",
        f"# Model version {version}, the validation split of its card ({len(images)} drawings), two gateway pods:",
        *notes,
        "rule_files:",
        "  - ../rules/quickdraw-recording.yml",
        "  - ../rules/quickdraw-alerts.yml",
        "",
        "evaluation_interval: 1m",
        "",
        "tests:",
    ]
    return "\n".join(head + body).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the file, or with --check report whether it is up to date."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if OUT.exists() and OUT.read_text() == text:
            return 0
        print(f"stale: {OUT.relative_to(ROOT)}: run python scripts/gen_drift_tests.py", file=sys.stderr)
        return 1
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
