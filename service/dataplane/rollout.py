"""Careful roll-outs, in the one pipeline: a weighted canary split of versionless calls, and shadow comparison.

A :class:`RolloutPlan` says both: ``split`` weighs the versions (or TF Serving version labels) that calls naming no
version go to (``{"1": 90, "2": 10}``, ``{"stable": 95, "canary": 5}``), and ``shadow`` names a candidate that a
fraction of calls is also sent to, off the caller's path, for comparison. The plan comes from the settings at start
(``--canary-split``, ``--shadow-version``, ``--shadow-fraction``) or from ``--rollout-file`` (JSON), which is read
again whenever it changes (:class:`PlanFile`), so ``quickdraw rollout promote|abort`` moves traffic without a
restart. Calls that name a version are never split (they may be shadowed: their answer is compared too).

**The split** (:class:`Split`) draws each versionless call's side at random, or, when the call carries a routing key
(gRPC metadata or HTTP header ``--routing-key-header``), from a hash of the key: one caller stays on one side as
long as the weights stay. A target that is not served now (a version not loaded yet, a label no replica knows) sends
its share to the default version. Counted in ``quickdraw_split_calls_total{target, version}``.

**The shadow** (:class:`Shadow`). A shadowed call asks its own batch for full probabilities (not top-k alone); once
the caller has its answer, its drawings and the stable version's probabilities are queued for the candidate:

- in a queue of its own, bounded by ``shadow_max_queued_drawings``; each shadowed call is one candidate batch, as
  its caller sent it (so the candidate's latency compares with the stable version's on the same batch), at most
  ``shadow_max_concurrent_calls`` in flight, each under ``backend_timeout_ms``;
- dropped, and counted in ``quickdraw_shadow_dropped_drawings_total{reason}``, when that queue is full
  (``queue_full``), when the backend is busy with callers' work (``busy``: every slot taken or a full batch
  waiting, when the call is offered and again when its batch would be sent), when admission is refusing
  (``refused``), when the candidate is not served (``unavailable``) or is the version that answered
  (``same_version``), and when the candidate's batch fails or times out (``error``); never retried (a TF Serving
  backend makes one attempt);
- compared per drawing: top-1 agreement, top-3 overlap, the total-variation distance of the two probability
  vectors, agreement on the out-of-class decision (when both versions make one), and latency (the candidate's batch;
  the stable version's call). Exported with ``stable`` and ``candidate`` version labels (``quickdraw_shadow_*``);
  ``quickdraw rollout status`` reads them from Prometheus and gates promotion on them.

The caller's answer never waits for any of it: the comparison runs in the shadow's own task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.backends import Answered, ModelDescription, TopK
from service.core.metrics import Metrics
from service.dataplane.batching import Batcher

log = logging.getLogger(__name__)

#: A call's transport metadata, asked for only when needed (gRPC's ``context.invocation_metadata``, an HTTP
#: request's ``headers.items``): (key, value) pairs.
Metadata = Callable[[], Iterable[tuple[str, Any]]]
#: The longest routing key read (a longer one is cut: it only seeds a hash).
MAX_ROUTING_KEY_CHARS = 256
#: A split or shadow target: a version number, or a TF Serving version label (its own syntax: a letter first).
TARGET = re.compile(r"^(?:[0-9]{1,18}|[A-Za-z][A-Za-z0-9_.-]{0,62})$")
#: Most targets in one split (the metrics' ``target`` label stays bounded).
MAX_TARGETS = 8
#: The classes compared for the top-3 overlap.
TOP_N = 3
#: Buckets of the total-variation distance between the stable and candidate probabilities of one drawing.
TV_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
#: Buckets of the top-3 overlap (0, 1, 2 or 3 classes in common, over 3).
OVERLAP_BUCKETS = (0.0, 1 / 3, 2 / 3, 1.0)


def _target(value: str) -> str:
    if not TARGET.match(value):
        raise ValueError(
            f"{value!r} is neither a version number nor a TF Serving version label (a letter, then letters, "
            "digits, '_', '.' or '-', at most 63 characters)"
        )
    return value.lstrip("0") or "0" if value.isdigit() else value


class ShadowPlan(BaseModel):
    """Send ``fraction`` of the calls also to ``target`` (a version or a label), for comparison only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description="the candidate: a version number or a TF Serving version label")
    fraction: float = Field(1.0, ge=0.0, le=1.0, description="share of calls also sent to the candidate")

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str) -> str:
        return _target(value)


class RolloutPlan(BaseModel):
    """Where versionless calls go (``split``: target -> weight) and what is shadowed (``shadow``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: dict[str, float] = Field(default_factory=dict, description="target (version or label) -> weight")
    shadow: ShadowPlan | None = None

    @field_validator("split")
    @classmethod
    def _weights(cls, split: dict[str, float]) -> dict[str, float]:
        if len(split) > MAX_TARGETS:
            raise ValueError(f"a split has at most {MAX_TARGETS} targets ({len(split)} given)")
        out: dict[str, float] = {}
        for name, weight in split.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"the weight of {name!r} must be a finite number >= 0 (got {weight})")
            key = _target(name)
            out[key] = out.get(key, 0.0) + weight
        if out and sum(out.values()) <= 0:
            raise ValueError("a split needs a weight above 0")
        return out

    @staticmethod
    def parse_split(text: str | None) -> dict[str, float]:
        """``"stable=95,canary=5"`` (or ``"1=90,2=10"``) as a dict; ValueError naming the bad part."""
        out: dict[str, float] = {}
        for part in (text or "").split(","):
            if not part.strip():
                continue
            name, sep, weight = part.partition("=")
            try:
                out[name.strip()] = float(weight) if sep else float("nan")
            except ValueError:
                raise ValueError(f"canary split part {part.strip()!r} is not target=weight") from None
            if not sep:
                raise ValueError(f"canary split part {part.strip()!r} is not target=weight")
        return out

    @classmethod
    def of(cls, split: str | None, shadow_target: str | None, shadow_fraction: float) -> RolloutPlan:
        """The plan the settings give (``--canary-split``, ``--shadow-version``, ``--shadow-fraction``)."""
        shadow = ShadowPlan(target=shadow_target, fraction=shadow_fraction) if shadow_target else None
        return cls(split=cls.parse_split(split), shadow=shadow)

    @classmethod
    def read(cls, path: Path) -> RolloutPlan:
        """The plan in a JSON file (``--rollout-file``); ValueError naming the file and the field."""
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"rollout file {path} cannot be read: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'plan'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"rollout file {path}: {problems}") from None

    def write(self, path: Path) -> None:
        """Write the plan to ``path`` atomically (a temporary file renamed over it): gateways never read half."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")
        tmp.replace(path)

    @property
    def labels(self) -> frozenset[str]:
        """The TF Serving version labels the plan names (its targets that are not version numbers)."""
        targets = [*self.split, *([self.shadow.target] if self.shadow else [])]
        return frozenset(t for t in targets if not t.isdigit())

    @property
    def active(self) -> bool:
        """Whether the plan splits or shadows anything."""
        return bool(self.split) or (self.shadow is not None and self.shadow.fraction > 0)


def resolve_target(target: str, model: ModelDescription) -> int | None:
    """The version ``target`` stands for now: a served version's number, or the version a TF Serving label points
    at (``ModelDescription.version_labels``); None when it is not served now."""
    if target.isdigit():
        v = int(target)
        return v if v in model.versions else None
    v = model.version_labels.get(target)
    return v if v is not None and v in model.versions else None


def routing_point(key: str) -> float:
    """Where a routing key falls in [0, 1): the same for every gateway and every restart (not Python's hash)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Split:
    """A weighted choice among targets; see the module."""

    def __init__(self, weights: dict[str, float], rng: random.Random | None = None) -> None:
        total = sum(weights.values())
        self.targets = tuple(weights)
        acc, bounds = 0.0, []
        for name in self.targets:
            acc += weights[name] / total
            bounds.append(acc)
        bounds[-1] = 1.0
        self._bounds = tuple(bounds)
        self._random = (rng or random.Random()).random

    def pick(self, key: str | None = None) -> str:
        """The target for one call: from its routing key when given, else at random."""
        u = routing_point(key) if key else self._random()
        for name, bound in zip(self.targets, self._bounds, strict=True):
            if u < bound:
                return name
        return self.targets[-1]


@dataclass
class _Shadowed:
    """One shadowed call's drawings, waiting for the candidate."""

    images: NDArray[np.uint8]
    probs: NDArray[np.float32]
    known: NDArray[np.float32] | None
    stable: int
    candidate: int
    #: The stable and the candidate version's out-of-class thresholds (None: that version makes no decision).
    thresholds: tuple[float | None, float | None]


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended; returns None, for the attribute that held it."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: The backend's batch call, for one attempt only: (images, version, deadline_s) -> its answer.
Predict = Callable[[NDArray[np.uint8], int, float | None], Awaitable[Any]]


class Shadow:
    """Shadow calls to a candidate version and their comparison with the stable one; see the module."""

    def __init__(
        self, predict: Predict, primary: Batcher, metrics: Metrics, max_queued_drawings: int = 512,
        timeout_s: float = 10.0, rng: random.Random | None = None, max_concurrent: int = 4,
    ) -> None:  # fmt: skip
        self._predict = predict
        self._primary = primary
        self._metrics = metrics
        self.max_queued_drawings = max_queued_drawings
        #: Candidate calls in flight at once.
        self.max_concurrent = max_concurrent
        self._timeout_s = timeout_s
        self._random = (rng or random.Random()).random
        self._queue: deque[_Shadowed] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The candidate (a version or a label) and the share of calls shadowed; None: no shadow.
        self.plan: ShadowPlan | None = None

    def start(self) -> None:
        """Start the shadow's own task (in the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="shadow")

    async def close(self) -> None:
        """Stop; what is queued is dropped (counted as ``shutdown``)."""
        self._task = await _cancelled(self._task)
        self._drop("shutdown", self._queued)
        self._queue.clear()
        self._queued = 0

    def _drop(self, reason: str, n: int) -> None:
        if n:
            m = self._metrics
            m.child(m.shadow_dropped, reason).inc(n)

    def wants(self, n: int) -> bool:
        """Whether to shadow a call of ``n`` drawings (decided before its batch: a shadowed call asks for full
        probabilities). Counts the drops decided now."""
        plan = self.plan
        if plan is None or plan.fraction <= 0 or (plan.fraction < 1.0 and self._random() >= plan.fraction):
            return False
        if n > self._primary.max_batch_size:
            self._drop("too_large", n)
            return False
        if self._queued + n > self.max_queued_drawings:
            self._drop("queue_full", n)
            return False
        if self._primary.refusing:
            self._drop("refused", n)
            return False
        if self._primary.busy:
            self._drop("busy", n)
            return False
        return True

    def offer(self, images: NDArray[np.uint8], answered: Answered, model: ModelDescription,
              stable_latency_s: float) -> None:  # fmt: skip
        """Queue a shadowed call's drawings for the candidate, once its caller has its answer; never blocks."""
        n = len(images)
        plan = self.plan
        if plan is None:
            return
        candidate = resolve_target(plan.target, model)
        if candidate is None:
            self._drop("unavailable", n)
            return
        if candidate == answered.version:
            self._drop("same_version", n)
            return
        if isinstance(answered.scores, TopK):
            self._drop("no_probabilities", n)
            return
        if self._queued + n > self.max_queued_drawings:
            self._drop("queue_full", n)
            return
        m = self._metrics
        m.child(m.shadow_latency, "stable", str(answered.version)).observe(stable_latency_s)
        ood = model.out_of_class
        thresholds = tuple(None if (o := ood.get(v)) is None else o.threshold for v in (answered.version, candidate))
        self._queue.append(_Shadowed(images, answered.scores, answered.known, answered.version, candidate,
                                     thresholds))  # type: ignore[arg-type]  # fmt: skip
        self._queued += n
        self._wake.set()

    async def _run(self) -> None:
        """Take queued calls in turn, at most ``max_concurrent`` candidate calls in flight."""
        slots = asyncio.Semaphore(self.max_concurrent)
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await slots.acquire()
                    if not self._queue:  # dropped meanwhile (close)
                        slots.release()
                        break
                    # one shadowed call per candidate call, as its caller sent it: the candidate's latency is then
                    # measured on the same batch as the stable version's (TF Serving batches them again itself)
                    item = self._queue.popleft()
                    self._queued -= len(item.images)
                    if self._primary.refusing or self._primary.busy:
                        self._drop("refused" if self._primary.refusing else "busy", len(item.images))
                        slots.release()
                        continue
                    task = asyncio.get_running_loop().create_task(self._one(item))
                    running.add(task)
                    task.add_done_callback(lambda t: (running.discard(t), slots.release()))
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _one(self, item: _Shadowed) -> None:
        """One candidate call and its comparison; its failure is counted, never the caller's."""
        n = len(item.images)
        try:
            await self._compare(item)
        except asyncio.CancelledError:
            self._drop("shutdown", n)
            raise
        except Exception as exc:
            self._drop("error", n)
            log.debug("shadow batch of %d drawings failed: %s", n, exc)

    async def _compare(self, item: _Shadowed) -> None:
        t0 = time.perf_counter()
        got = await asyncio.wait_for(self._predict(item.images, item.candidate, time.monotonic() + self._timeout_s),
                                     self._timeout_s)  # fmt: skip
        took = time.perf_counter() - t0
        if isinstance(got, Answered):
            cand, cand_known, answered_by = got.scores, got.known, got.version
        else:
            cand, cand_known, answered_by = got, None, item.candidate
        if isinstance(cand, TopK) or answered_by != item.candidate:
            self._drop("error", len(item.images))
            return
        self._record(Comparison.of(item.probs, np.asarray(cand, np.float32)), item.stable, item.candidate, took)
        ts, tc = item.thresholds
        if item.known is not None and cand_known is not None and ts is not None and tc is not None:
            agree = (item.known >= ts) == (np.asarray(cand_known) >= tc)
            m, s, k = self._metrics, str(item.stable), str(item.candidate)
            m.child(m.shadow_ood_compared, s, k).inc(len(agree))
            m.child(m.shadow_ood_agreements, s, k).inc(int(agree.sum()))

    def _record(self, c: Comparison, stable: int, candidate: int, took_s: float) -> None:
        m = self._metrics
        s, k = str(stable), str(candidate)
        m.child(m.shadow_latency, "candidate", k).observe(took_s)
        m.child(m.shadow_compared, s, k).inc(len(c.top1))
        m.child(m.shadow_top1_agreements, s, k).inc(int(c.top1.sum()))
        overlap = m.child(m.shadow_top3_overlap, s, k)
        for value in c.overlap:
            overlap.observe(float(value))
        tv = m.child(m.shadow_total_variation, s, k)
        for value in c.tv:
            tv.observe(float(value))


@dataclass(frozen=True)
class Comparison:
    """Per drawing: top-1 agreement, top-3 overlap (0..1) and the total-variation distance of two probability
    arrays [n, classes]."""

    top1: NDArray[np.bool_]
    overlap: NDArray[np.float64]
    tv: NDArray[np.float64]

    @staticmethod
    def of(stable: NDArray[np.float32], candidate: NDArray[np.float32]) -> Comparison:
        """Compare two probability arrays of the same shape, row by row."""
        if stable.shape != candidate.shape:
            raise ValueError(f"cannot compare probabilities of shapes {stable.shape} and {candidate.shape}")
        order_s = np.argsort(-stable, axis=1, kind="stable")[:, :TOP_N]
        order_c = np.argsort(-candidate, axis=1, kind="stable")[:, :TOP_N]
        top1 = order_s[:, 0] == order_c[:, 0]
        common = (order_s[:, :, None] == order_c[:, None, :]).any(axis=2).sum(axis=1)
        overlap = common / float(order_s.shape[1] or 1)
        tv = 0.5 * np.abs(stable.astype(np.float64) - candidate.astype(np.float64)).sum(axis=1)
        return Comparison(top1, overlap, tv)


class PlanFile:
    """``--rollout-file``, read again whenever its modification time or size changes (polled every ``poll_s``).

    A file that cannot be read or validated keeps the plan in force (logged once per change); a file that
    disappears keeps it too (the settings' plan is not restored behind the operator's back)."""

    def __init__(self, path: Path, apply: Callable[[RolloutPlan], None], poll_s: float = 2.0) -> None:
        self.path = path
        self._apply = apply
        self.poll_s = poll_s
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> RolloutPlan | None:
        """Read the file now if it changed since last time; the plan, or None when unchanged or unreadable."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._seen:
            return None
        self._seen = stamp
        try:
            plan = RolloutPlan.read(self.path)
        except ValueError as exc:
            log.error("%s; the roll-out plan in force is kept", exc)
            return None
        self._apply(plan)
        return plan

    def start(self) -> None:
        """Poll in a task of its own (the file is small: read on the loop)."""
        if self._task is None and self.poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="rollout-file")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.load()

    async def close(self) -> None:
        """Stop polling."""
        self._task = await _cancelled(self._task)


class Rollout:
    """The plan in force, as the data plane applies it: the split, and the shadow's candidate."""

    def __init__(
        self, metrics: Metrics, shadow: Shadow | None = None, routing_key_header: str = "x-routing-key"
    ) -> None:
        self._metrics = metrics
        self.shadow = shadow
        #: The metadata key (lower case) whose value keeps a caller on one side of the split.
        self.routing_key_header = routing_key_header
        self.plan = RolloutPlan()
        self._split: Split | None = None

    def apply(self, plan: RolloutPlan) -> None:
        """Put ``plan`` in force (at start, and on every change of the rollout file)."""
        self.plan = plan
        self._split = Split(plan.split) if plan.split else None
        if self.shadow is not None:
            self.shadow.plan = plan.shadow
        log.info("roll-out plan: split %s, shadow %s", plan.split or "none",
                 f"{plan.shadow.fraction:g} of calls to {plan.shadow.target}" if plan.shadow else "none")  # fmt: skip

    def route(self, model: ModelDescription, metadata: Metadata | None, default: int) -> int:
        """The version a versionless call goes to: ``default`` (what it would get without a split: the default
        version, or ``ANY_VERSION``) unless the split sends it to a served target other than the default.
        ``metadata``: the call's, read for its routing key only when there is a split."""
        split = self._split
        if split is None:
            return default
        target = split.pick(self._routing_key(metadata))
        version = resolve_target(target, model)
        m = self._metrics
        if version is None:
            m.child(m.split_calls, target, "default").inc()
            return default
        m.child(m.split_calls, target, str(version)).inc()
        return default if version == model.default_version else version

    def _routing_key(self, metadata: Metadata | None) -> str | None:
        """The call's routing key (``routing_key_header`` in its metadata, cut to ``MAX_ROUTING_KEY_CHARS``), or
        None."""
        if metadata is None:
            return None
        header = self.routing_key_header
        for key, value in metadata():
            if key.lower() == header:
                text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
                return text[:MAX_ROUTING_KEY_CHARS] or None
        return None
