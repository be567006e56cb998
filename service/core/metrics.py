"""Every Prometheus metric of the gateway, declared once, here, in its own registry.

Names carry the ``quickdraw_`` namespace and a unit suffix; labels have bounded cardinality (method and status
code come from fixed sets, kinds from the three input forms, versions from the few a model has, classes from the
model's labels). Latency buckets span 0.5 ms to 5 s.

Model health (issue 26) is counted in plain Python by ``service.core.modelhealth`` and exported at scrape time by
``ModelHealthCollector`` (its families are declared in ``ModelHealthCollector.FAMILIES``): no prometheus_client
call per drawing.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import ClassVar, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from doodle import BITMAP_PIXELS
from service.core.modelhealth import ModelHealth, VersionCounts

NAMESPACE = "quickdraw"
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0,
)  # fmt: skip


class Histogram(prometheus_client.Histogram):
    """prometheus_client's Histogram, whose ``observe`` finds the bucket by bisection under one lock.

    The library walks the bounds in Python (``enumerate``, a comparison per bucket: 22 latency buckets) and takes two
    locks through two calls (the sum's, the bucket's), about 1 us per observation; several are made per call. Here
    every observation of a child takes the lock of its sum alone and updates the sum and the bucket under it (0.30
    against 0.52 us in a tight loop), so every update of a child's values is serialized by that one lock (readers
    take each value's own lock, as the library's exposition does: a float is read whole). NaN counts in the sum
    and no bucket, as the library's walk counts it. The exposition is the library's.

    That path reads the library's in-process values (a lock and a float each: ``_lock``, ``_value``). Where they
    are not that (multiprocess mode, a labelled parent, another release's internals), and for an exemplar (the
    gateway sets none), ``observe`` is the library's own.
    """

    #: Whether this child's sum and buckets are the library's in-process values, a lock and a float each.
    _one_lock = False

    def _metric_init(self) -> None:
        super()._metric_init()
        self._one_lock = all(
            isinstance(getattr(v, "_value", None), float) and hasattr(getattr(v, "_lock", None), "__enter__")
            for v in (self._sum, *self._buckets)
        )

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        """Count ``amount`` in its bucket (the first whose upper bound is >= it) and in the sum."""
        if exemplar or not self._one_lock:
            super().observe(amount, exemplar)
            return
        total = self._sum
        with total._lock:
            total._value += amount
            if amount == amount:
                self._buckets[bisect_left(self._upper_bounds, amount)]._value += 1


#: A labelled metric (its children are of the same class).
M = TypeVar("M", Counter, Gauge, Histogram)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to the largest batch, so the histogram shows how full batches are."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(float(b))
        b *= 2
    out.append(float(max_batch_size))
    return tuple(out)


class ModelHealthCollector(Collector):
    """The model-health families (``service.core.modelhealth``), built from its counts at each scrape: per served
    version, and class (the model's labels), and kind (the three input forms)."""

    #: name -> (type, labels, help); counters without their ``_total``.
    FAMILIES: ClassVar[dict[str, tuple[str, tuple[str, ...], str]]] = {
        "quickdraw_predictions": ("counter", ("version", "class"),
            "Drawings answered, by model version and top-1 class (the model's labels only)."),
        "quickdraw_top1_probability": ("histogram", ("version",),
            "The top-1 probability of each drawing answered, by model version."),
        "quickdraw_known_score": ("histogram", ("version",),
            "The known_score of each drawing answered by a version that makes the out-of-class decision (buckets: "
            "the model card's validation distribution's)."),
        "quickdraw_out_of_class": ("counter", ("version",),
            "Drawings decided out-of-class (known_score under the version's threshold); the rate is this over "
            "quickdraw_known_score_count."),
        "quickdraw_ink_fraction": ("histogram", ("version",),
            "The share of each drawing's 784 pixels that are not 0 (ink), as the model got it, by model version."),
        "quickdraw_model_drawings": ("counter", ("version", "kind"),
            "Drawings answered, by model version and input kind (bitmap, image, strokes)."),
        "quickdraw_model_reference_class_share": ("gauge", ("version", "class"),
            "The share of validation drawings each class was the top-1 prediction of (the model card's "
            "validation distribution), for versions whose card has one."),
        "quickdraw_model_reference_top1_probability_mean": ("gauge", ("version",),
            "The mean top-1 probability on the validation split (model card)."),
        "quickdraw_model_reference_known_score_mean": ("gauge", ("version",),
            "The mean known_score on the validation split (model card)."),
        "quickdraw_model_reference_out_of_class_ratio": ("gauge", ("version",),
            "The share of validation drawings decided out-of-class (model card)."),
        "quickdraw_model_reference_ink_fraction_mean": ("gauge", ("version",),
            "The mean ink fraction of the validation drawings (model card)."),
    }  # fmt: skip

    def __init__(self, health: ModelHealth) -> None:
        self.health = health

    def describe(self) -> Iterator[Metric]:
        """The families, empty (for the registry's name checks and the metrics reference)."""
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        for name, (kind, labels, text) in self.FAMILIES.items():
            yield kinds[kind](name, text, labels=list(labels))

    def collect(self) -> Iterator[Metric]:
        """The families, from the counts now."""
        h = self.health
        fam = {m.name: m for m in self.describe()}
        labels = h.labels
        for version, v in sorted(h.versions.items()):
            ver = str(version)
            for label, n in zip(labels, v.classes, strict=True):
                fam["quickdraw_predictions"].add_metric([ver, label], n)
            _histogram(fam["quickdraw_top1_probability"], ver, v.top1_bounds, v.top1, v.top1_sum)
            if v.threshold is not None:
                _histogram(fam["quickdraw_known_score"], ver, v.known_bounds, v.known, v.known_sum)
                fam["quickdraw_out_of_class"].add_metric([ver], v.out_of_class)
            _histogram(fam["quickdraw_ink_fraction"], ver, v.ink_bounds, v.ink, v.ink_pixels / BITMAP_PIXELS)
            for kind, n in sorted(v.kinds.items()):
                fam["quickdraw_model_drawings"].add_metric([ver, str(kind)], n)
            _reference(fam, ver, v, labels)
        yield from fam.values()


def _histogram(family: HistogramMetricFamily, version: str, bounds: tuple[float, ...], counts: list[int],
               total: float) -> None:  # fmt: skip
    cumulative, buckets = 0, []
    for bound, n in zip((*bounds, math.inf), counts, strict=True):
        cumulative += n
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric([version], buckets, total)


def _reference(fam: dict[str, Metric], version: str, v: VersionCounts, labels: tuple[str, ...]) -> None:
    r = v.reference
    if r is None:
        return
    for label, share in zip(labels, r.class_share, strict=True):
        fam["quickdraw_model_reference_class_share"].add_metric([version, label], share)
    means = (("top1_probability", r.top1_mean), ("ink_fraction", r.ink_mean),
             ("known_score", r.known_mean if v.threshold is not None else None))  # fmt: skip
    for what, mean in means:
        if mean is not None:
            fam[f"quickdraw_model_reference_{what}_mean"].add_metric([version], mean)
    if r.out_of_class_rate is not None and v.threshold is not None:
        fam["quickdraw_model_reference_out_of_class_ratio"].add_metric([version], r.out_of_class_rate)


class Metrics:
    """The gateway's metrics; one instance per server, built by the composition root."""

    def __init__(self, max_batch_size: int = 128, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Counter | Gauge | Histogram] = {}
        r, ns = self.registry, NAMESPACE
        # process_cpu_seconds_total, process_resident_memory_bytes...: the gateway HPA scales on its own CPU
        # (deploy/prometheus/adapter/config.yaml), read from here rather than from the cluster's cAdvisor.
        ProcessCollector(registry=r)
        self.request_latency = Histogram(
            "request_duration_seconds",
            "Time from a call's arrival to its answer, by method (gRPC, or http:<method> for JSON) and gRPC code.",
            ["method", "code"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "Time the oldest drawing of each backend batch waited in the batcher's queue before the batch was "
            "dispatched (one observation per batch: the longest wait in it).",
            namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.backend_latency = Histogram(
            "backend_duration_seconds",
            "Time the backend took for one batch, by backend and outcome: ok, error (failed or timed out), cancelled "
            "(every caller had gone).",
            ["backend", "outcome"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.preprocess_latency = Histogram(
            "preprocess_duration_seconds", "Time to turn one call's drawings into bitmaps, by input kind.",
            ["kind"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "batch_size_drawings", "Drawings per backend batch.",
            namespace=ns, buckets=batch_size_buckets(max_batch_size), registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "inflight_requests", "Calls being handled now (Classify calls and stream messages).",
            namespace=ns, registry=r,
        )  # fmt: skip
        #: What ``inflight`` reports, read at scrape time: a plain count kept by ``service.core.calls.Observed`` on
        #: the event loop (two locked gauge updates per call otherwise).
        self.calls_in_flight = 0
        self.inflight.set_function(lambda: self.calls_in_flight)
        self.queue_depth = Gauge(
            "queue_depth_drawings", "Drawings waiting in the batcher's queue.", namespace=ns, registry=r
        )
        self.inflight_batches = Gauge(
            "inflight_batches", "Backend batches running now.", namespace=ns, registry=r
        )
        #: What ``inflight_batches`` reports, read at scrape time: a plain count kept by the batchers on the loop.
        self.batches_in_flight = 0
        self.inflight_batches.set_function(lambda: self.batches_in_flight)
        self.drawings = Counter(
            "drawings_total", "Drawings received, by input kind (bitmap, image, strokes).",
            ["kind"], namespace=ns, registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "dropped_drawings_total",
            "Drawings never sent to the backend, by reason: deadline, cancelled (the caller went away), unavailable "
            "(refused once queued: a background task died, or the backend is wedged).",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "rejected_requests_total", "Calls refused because the queue was full.", namespace=ns, registry=r
        )
        self.model_version = Gauge(
            "model_version_info", "1 for each model version being served.",
            ["model", "version", "backend"], namespace=ns, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "request_errors_total",
            "Calls answered with an error, by method, gRPC code and fault: client (bad, oversized, unauthenticated "
            "or cancelled calls, and callers' own deadlines) or server (only these feed the error-ratio alert).",
            ["method", "code", "fault"], namespace=ns, registry=r,
        )  # fmt: skip
        self.auth_failures = Counter(
            "auth_failures_total",
            "Calls refused for their credentials, by transport (grpc, http) and reason (missing, malformed, "
            "invalid, client_certificate).",
            ["transport", "reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.http_connections = Gauge(
            "http_connections", "HTTP connections open now.", namespace=ns, registry=r
        )
        self.http_connections_closed = Counter(
            "http_connections_closed_total",
            "HTTP connections the gateway closed itself, by reason: limit (over max_http_connections, none idle), "
            "evicted (the longest-idle one, to make room under max_http_connections), header_timeout (request "
            "headers not complete within http_header_timeout_s).",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.backend_replicas = Gauge(
            "backend_replicas",
            "TF Serving replicas by state: up (answered the last status poll) and serving (up, with an accepted "
            "version).",
            ["state"], namespace=ns, registry=r,
        )  # fmt: skip
        self.backend_retries = Counter(
            "backend_retries_total",
            "Backend attempts made again for a batch, by reason: unavailable (a lost replica: on another one), "
            "not_found (the replica no longer had the version), unchecked_version (answered by a version not "
            "accepted: asked again by number).",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        self.backend_versions_refused = Counter(
            "backend_versions_refused_total",
            "Model versions refused by their check (signature width or labels differ from what the gateway serves):"
            " never routed to.",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.backend_label_disagreements = Counter(
            "backend_label_disagreements_total",
            "Status polls in which TF Serving replicas disagreed on the version label's version (health unchanged).",
            namespace=ns, registry=r,
        )  # fmt: skip
        self.ready = Gauge("ready", "1 once the model is loaded and warmed up.", namespace=ns, registry=r)
        # --- roll-outs (service.dataplane.rollout): the canary split and shadow comparison ------------------------
        self.split_calls = Counter(
            "split_calls_total",
            "Versionless calls routed by the canary split, by target (a version or TF Serving label of the split) "
            "and the version it stood for (default: the target was not served, so the default version answered).",
            ["target", "version"], namespace=ns, registry=r,
        )  # fmt: skip
        self.shadow_compared = Counter(
            "shadow_compared_drawings_total",
            "Drawings answered by the stable version and, in the shadow, by the candidate, and compared.",
            ["stable", "candidate"], namespace=ns, registry=r,
        )  # fmt: skip
        self.shadow_top1_agreements = Counter(
            "shadow_top1_agreements_total",
            "Compared drawings whose top-1 class was the same for the stable and the candidate version.",
            ["stable", "candidate"], namespace=ns, registry=r,
        )  # fmt: skip
        self.shadow_top3_overlap = Histogram(
            "shadow_top3_overlap_ratio",
            "Share of the stable version's 3 best classes that are among the candidate's 3 best, per compared drawing.",
            ["stable", "candidate"], namespace=ns, buckets=(0.0, 1 / 3, 2 / 3, 1.0), registry=r,
        )  # fmt: skip
        self.shadow_total_variation = Histogram(
            "shadow_total_variation_ratio",
            "Total-variation distance between the stable and the candidate's probabilities (half the L1 distance, "
            "0 to 1), per compared drawing.",
            ["stable", "candidate"], namespace=ns,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r,
        )  # fmt: skip
        self.shadow_ood_compared = Counter(
            "shadow_out_of_class_compared_drawings_total",
            "Compared drawings for which both versions make an out-of-class decision.",
            ["stable", "candidate"], namespace=ns, registry=r,
        )  # fmt: skip
        self.shadow_ood_agreements = Counter(
            "shadow_out_of_class_agreements_total",
            "Compared drawings on whose out-of-class decision (known or not) both versions agreed.",
            ["stable", "candidate"], namespace=ns, registry=r,
        )  # fmt: skip
        self.shadow_latency = Histogram(
            "shadow_duration_seconds",
            "For shadowed calls, by role and version: stable, the caller's wait for its backend answer; candidate, "
            "the shadow batch's backend call.",
            ["role", "version"], namespace=ns, buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.shadow_dropped = Counter(
            "shadow_dropped_drawings_total",
            "Drawings not compared, by reason: queue_full, busy (every backend slot taken, or a full batch of callers' "
            "drawings waiting), refused (admission refusing), unavailable (the candidate is not served), "
            "same_version (the candidate answered the call), too_large, no_probabilities, error (the candidate failed "
            "or timed out; never retried), shutdown.",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip
        #: Model health per served version (issue 26): counted by the data plane, exported at scrape time.
        self.health = ModelHealth()
        r.register(ModelHealthCollector(self.health))

    def child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, bound once and kept: what the hot path uses.

        prometheus_client's ``labels()`` checks, converts and locks on every call (microseconds a call, several
        times per request); label sets are few (bounded, see the module docstring), so each child is bound once.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]
