"""Every Prometheus metric of the gateway, declared once, here, in its own registry.

Names carry the ``quickdraw_`` namespace and a unit suffix; labels have bounded cardinality (method and status
code come from fixed sets, kinds from the three input forms, versions from the few a model has). Latency
buckets span 0.5 ms to 5 s.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

NAMESPACE = "quickdraw"
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0,
)  # fmt: skip


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
        self.queue_depth = Gauge(
            "queue_depth_drawings", "Drawings waiting in the batcher's queue.", namespace=ns, registry=r
        )
        self.inflight_batches = Gauge(
            "inflight_batches", "Backend batches running now.", namespace=ns, registry=r
        )
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
            "Drawings not compared, by reason: queue_full, busy (callers' work queued or every backend slot taken), "
            "refused (admission refusing), unavailable (the candidate is not served), same_version (the candidate "
            "answered the call), too_large, no_probabilities, error (the candidate failed or timed out; never "
            "retried), shutdown.",
            ["reason"], namespace=ns, registry=r,
        )  # fmt: skip

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
