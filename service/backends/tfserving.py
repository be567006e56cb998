"""The TF Serving backend: batches go to ``tensorflow.serving.PredictionService/Predict`` on a set of replicas.

In production several TF Serving replicas share one model volume and each polls it on its own schedule, so
during every roll-out, rollback and label move they disagree for a while about which versions exist. This
backend is written for that world:

- **Replicas.** ``tfserving_target`` names them: ``ipv4:a:p,b:p`` (or ``ipv6:``) lists them; ``dns:///host:port``
  (a headless Kubernetes Service) is resolved to every address, again at every status poll, so pods that come
  and go are followed; any other target (``host:port``, ``unix:``) is one replica. Each replica gets a channel
  of its own, and the backend balances batches over them itself (round robin over the replicas that can
  answer the batch), because it must know which replica serves which version.
- **Status.** Every ``tfserving_status_poll_s`` (and at once after a NOT_FOUND or a lost replica) each replica
  is asked ``ModelService/GetModelStatus``; with ``tfserving_version_label``, also which version that label
  points at on it (``GetModelMetadata`` by label: TF Serving has no call that lists labels). Readiness: at
  least one replica serves an accepted version. The versions the gateway lists (GetModelInfo, its ModelService)
  are the union, over the replicas that answer, of their AVAILABLE versions that were accepted; the default
  version is the highest of the replicas' own defaults.
- **New versions are checked before anything is routed to them**: the signature (``GetModelMetadata`` of that
  version on a replica that has it) must take ``image`` and give ``probabilities`` as wide as the labels, with
  top-k outputs as wide as at start; its ``assets/labels.txt`` under ``--model-dir`` (the shared model volume,
  mounted read-only) must name the same classes, in the same order, as the gateway serves (with
  ``--labels-file``, the width alone is checked). A version that fails is refused: logged, counted in
  ``quickdraw_backend_versions_refused_total``, and never used to answer.
- **Calls that name no version never fail because replicas disagree.** They go out with no version (or with
  the version label), so each replica answers with its own default, and the answer's ``model_spec.version``
  says which version produced it; the caller gets that version. A replica whose newest version is refused is
  asked for its highest accepted one by number. An answer from a version not (yet) accepted is never passed
  on: the batch is asked again, by number, for an accepted version.
- **Calls that name a version** go only to replicas that list it. A NOT_FOUND (the replica unloaded it since
  the last poll) is retried on another replica that lists it, at most ``tfserving_max_attempts`` attempts in
  all, then the caller gets NOT_FOUND.
- **Label disagreements** (replicas whose label points at different versions, as while a label is moved one
  replica at a time) are logged (rate-limited) and counted in ``quickdraw_backend_label_disagreements_total``;
  health does not change.
- **No retry storms.** TF Serving's "queue full" answer (UNAVAILABLE with the batch scheduler's message, or
  RESOURCE_EXHAUSTED) reaches the caller as RESOURCE_EXHAUSTED at once, never retried here (the Python client
  does not retry it either). A lost replica's UNAVAILABLE is retried on another replica, and every retry this
  backend makes draws on a token bucket with gRPC's ``retryThrottling`` rule (gRFC A6: each failure takes a
  token, each success gives back ``tfserving_retry_token_ratio``; retries stop while half or fewer of
  ``tfserving_retry_max_tokens`` are left). Predict has no gRPC retry policy of its own (it would retry a full
  queue on the same replica); the status calls have one, with the same ``retryThrottling``.
- Each batch's deadline is the latest remaining deadline among its callers, less a small margin for the
  network hops (``tfserving_deadline_margin_ms``), capped by ``backend_timeout_ms``: TF Serving never works
  for a caller that has gone. A batch whose callers have all gone is cancelled by the batcher, with its RPC.
- A batch whose callers want only their best few classes asks for the signature's ``top_k_scores`` and
  ``top_k_indices`` alone (``output_filter``; ``predict_top_k``): 40 bytes a drawing instead of every
  probability.
- **Out-of-class detection** (issue 18): when the version expected to answer gives ``known_score``
  (``doodle.contract.KNOWN_SCORE``, seen in its signature when it was checked), every batch asks for it too
  (``output_filter``, on the top-k path as well) and passes it on (``Answered.known``); its threshold is read from
  ``<model_dir>/<version>/model_card.json`` (``ModelDescription.out_of_class``), as the labels are (with
  ``--labels-file`` and no such card, the version makes no decision). A version with or without the output is
  ACCEPTED whatever the reference version has: models exported before issue 18 and after it may be served side by
  side during a roll-out, each answer carrying a decision only when the version that gave it makes one. (A card
  whose out-of-class entry is unusable refuses the version.) A versionless batch that asked for ``known_score``
  of a replica that has meanwhile loaded a version without it (TF Serving's INVALID_ARGUMENT "output tensor alias
  not found") is asked again without it, counted as ``unchecked_version``, and the status is polled at once.
- Keepalive pings find dead peers; message sizes are capped both ways; channels reconnect with a short capped
  backoff. TLS or mTLS per the ``tfserving_tls*`` settings (``service.security.tfserving_channel``).
- The status poller is supervised: if it dies, ``on_failure`` is told (the gateway reports NOT_SERVING).
- The messages are ``service.protos.tfs``'s (vendored TF Serving 2.21 protos in a private descriptor pool) and the
  stubs call methods by path: this backend loads no TensorFlow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from doodle import contract
from service.backends import (
    ANY_VERSION,
    Answered,
    ModelDescription,
    OutOfClassInfo,
    TopK,
    find_versions,
    read_labels,
    read_out_of_class,
)
from service.backends.tfserving_replicas import (
    Replica,
    RetryBudget,
    Targets,
    channel_options,
    lacks_known_score,
    mapped,
    overloaded,
)
from service.core.errors import BackendError, DeadlineExceeded, NotFound, Unavailable
from service.core.metrics import Metrics
from service.protos import tfs
from service.protos.tensors import TensorDecodeError, exact, to_numpy, write_uint8
from service.runtime.lograte import LogRate
from service.security.tls import tfserving_channel
from service.settings import Settings

log = logging.getLogger(__name__)

INPUT_KEY = contract.INPUT_KEY
OUTPUT_KEY = contract.OUTPUT_KEY
TOP_K_SCORES, TOP_K_INDICES = contract.TOP_K_SCORES, contract.TOP_K_INDICES
KNOWN_SCORE = contract.KNOWN_SCORE
AVAILABLE = tfs.AVAILABLE
#: Shortest pause between two status polls (a burst of NOT_FOUNDs asks for one early poll, not one each).
MIN_POLL_GAP_S = 0.2
#: Most PredictRequest templates kept (``TFServingBackend._request``); a few outputs x versions x batch sizes.
MAX_REQUEST_TEMPLATES = 1024


@dataclass
class _Signature:
    """What a version's signature gives: probabilities width (None: unknown), top-k width (0: none), and whether it
    gives ``KNOWN_SCORE``."""

    classes: int | None
    top_k: int
    defs: Any = field(repr=False, default=None)
    known: bool = False


def _what(n: int, version: int) -> str:
    """A batch's Predict as its errors name it (built only when one is raised)."""
    which = "the default version" if version == ANY_VERSION else f"version {version}"
    return f"Predict of {n} drawings on {which}"


class TFServingBackend:
    """Runs batches on TF Serving replicas; see the module docstring."""

    name = "tfserving"
    #: Calls that name no version reach TF Serving with none (each replica answers with its own default).
    versionless = True

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self._s = settings
        self._clock = clock
        self._targets = Targets(settings.tfserving_target)
        self._replicas: list[Replica] = []
        self._rr = 0
        self._budget = RetryBudget(settings.tfserving_retry_max_tokens, settings.tfserving_retry_token_ratio)
        self._poller: asyncio.Task[None] | None = None
        self._description: ModelDescription | None = None
        self._labels: tuple[str, ...] = ()
        #: Why each version seen is refused (None: accepted). Forgotten once no replica serves it.
        self._verdicts: dict[int, str | None] = {}
        self._accepted: frozenset[int] = frozenset()
        #: Accepted versions whose signature gives ``KNOWN_SCORE`` (asked for whenever one of them answers).
        self._known: set[int] = set()
        #: Accepted versions' out-of-class decisions (their model card's threshold), for those that make one.
        self._out_of_class: dict[int, OutOfClassInfo] = {}
        #: Width of the signature's top_k_* outputs (0 without them): what ``predict_top_k`` gives.
        self.top_k_width = 0
        #: PredictRequests without their input's bytes, by (outputs, version sent, by label, input shape): a request
        #: is a copy of one (one copy in C) with the bytes set, not built field by field (~2 us less per call).
        self._templates: dict[tuple[tuple[str, ...], int, bool, tuple[int, ...]], Any] = {}
        #: Every signature of the served SavedModel, as TF Serving's GetModelMetadata gave it (a SignatureDefMap).
        self.signature_defs: Any = None
        self._refresh = asyncio.Event()
        #: Version labels followed beside ``tfserving_version_label`` (the roll-out plan's: ``watch_labels``).
        self.watched_labels: frozenset[str] = frozenset()
        self._disagreeing = False
        self._lograte = LogRate(log, interval_s=30.0)
        #: The gateway's metrics (set by the composition root before start; None: not counted).
        self.metrics: Metrics | None = None
        #: Called with the new description when the served versions change, None when none is left.
        self.on_change: Callable[[ModelDescription | None], None] | None = None
        #: Called with what died and why when the status poller dies.
        self.on_failure: Callable[[str, BaseException | None], None] | None = None

    # --- replicas ----------------------------------------------------------------------------------------------
    def _open(self, address: str) -> Replica:
        options = channel_options(self._s)
        if self._targets.authority is not None:
            options.append(("grpc.default_authority", self._targets.authority))
        channel = tfserving_channel(self._s, options, target=address)
        return Replica(address, channel, tfs.PredictionServiceStub(channel), tfs.ModelServiceStub(channel))

    async def _sync_replicas(self) -> None:
        """Open channels to new addresses and close those of addresses gone (dns: targets)."""
        try:
            addresses = await self._targets.addresses()
        except OSError as exc:
            if not self._replicas:
                raise
            self._lograte.log("resolve", "cannot resolve %s (%s); keeping %d replicas", self._targets.target, exc,
                              len(self._replicas))  # fmt: skip
            return
        known = {r.address: r for r in self._replicas}
        kept = [known[a] if a in known else self._open(a) for a in addresses]
        for r in self._replicas:
            if r.address not in addresses:
                log.info("TF Serving replica %s is gone from %s", r.address, self._targets.target)
                await r.channel.close()
        self._replicas = kept

    async def _poll_replica(self, r: Replica, timeout_s: float = 5.0) -> None:
        """Ask one replica its AVAILABLE versions (and its label's version)."""
        s = self._s
        req = tfs.GetModelStatusRequest()
        req.model_spec.name = s.model_name
        try:
            resp = await r.models.GetModelStatus(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if r.up or r.versions:
                self._lograte.log(f"status {r.address}", "TF Serving replica %s: status unknown: %s %s", r.address,
                                  exc.code().name, exc.details())  # fmt: skip
            # NOT_FOUND: it runs, and has no version of the model (yet)
            r.up, r.versions, r.labelled = exc.code() == grpc.StatusCode.NOT_FOUND, (), None
            r.error = f"{exc.code().name}: {exc.details()}"
            return
        r.up, r.error = True, ""
        r.versions = tuple(sorted(v.version for v in resp.model_version_status if v.state == AVAILABLE))
        r.labelled = await self._label_on(r, timeout_s) if s.tfserving_version_label and r.versions else None
        labels = {}
        for label in self.watched_labels if r.versions else ():
            if (v := await self._label_on(r, timeout_s, label)) is not None:
                labels[label] = v
        r.labels = labels

    def watch_labels(self, labels: frozenset[str]) -> None:
        """Follow these version labels too (a roll-out plan's targets): ``ModelDescription.version_labels``."""
        if labels != self.watched_labels:
            self.watched_labels = labels
            self._refresh.set()

    async def _label_on(self, r: Replica, timeout_s: float, label: str | None = None) -> int | None:
        """The version ``label`` (default ``tfserving_version_label``) points at on ``r`` (None when it does not
        know the label)."""
        label = label or self._s.tfserving_version_label or ""
        req = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = self._s.model_name
        req.model_spec.version_label = label
        try:
            resp = await r.predict.GetModelMetadata(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            self._lograte.log(f"label {r.address} {label}", "TF Serving replica %s: label %r: %s %s", r.address,
                              label, exc.code().name, exc.details())  # fmt: skip
            return None
        return int(resp.model_spec.version.value)

    # --- signatures and labels ---------------------------------------------------------------------------------
    async def _signature(self, r: Replica, version: int, timeout_s: float = 10.0) -> _Signature:
        """Check ``version``'s signature on ``r`` (raises ValueError if unusable, AioRpcError if not asked)."""
        s = self._s
        req = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = s.model_name
        req.model_spec.version.value = version
        resp = await r.predict.GetModelMetadata(req, timeout=timeout_s)
        sigs = tfs.SignatureDefMap()
        if not resp.metadata["signature_def"].Unpack(sigs):
            raise ValueError(f"its signature_def metadata is a {resp.metadata['signature_def'].type_url!r}, not a "
                             f"{tfs.SIGNATURE_DEF_MAP_URL!r}")  # fmt: skip
        if s.tfserving_signature not in sigs.signature_def:
            raise ValueError(f"it has no signature {s.tfserving_signature!r}; it has {sorted(sigs.signature_def)}")
        sig = sigs.signature_def[s.tfserving_signature]
        if INPUT_KEY not in sig.inputs or OUTPUT_KEY not in sig.outputs:
            raise ValueError(f"signature {s.tfserving_signature!r} must take {INPUT_KEY!r} and give {OUTPUT_KEY!r}; "
                             f"it takes {sorted(sig.inputs)} and gives {sorted(sig.outputs)}")  # fmt: skip
        top_k = 0
        if TOP_K_SCORES in sig.outputs and TOP_K_INDICES in sig.outputs:
            dims = [d.size for d in sig.outputs[TOP_K_SCORES].tensor_shape.dim]
            top_k = dims[1] if len(dims) == 2 and dims[1] > 0 else 0
        known = KNOWN_SCORE in sig.outputs
        if known:
            dims = [d.size for d in sig.outputs[KNOWN_SCORE].tensor_shape.dim]
            if len(dims) != 1 or sig.outputs[KNOWN_SCORE].dtype != tfs.DataType.Value("DT_FLOAT"):
                raise ValueError(f"its {KNOWN_SCORE!r} output must be float32 [n], not "
                                 f"{tfs.DataType.Name(sig.outputs[KNOWN_SCORE].dtype)} {dims}")  # fmt: skip
        dims = [d.size for d in sig.outputs[OUTPUT_KEY].tensor_shape.dim]
        return _Signature(dims[1] if len(dims) == 2 and dims[1] > 0 else None, top_k, sigs, known)

    def _read_out_of_class(self, version: int, known: bool) -> OutOfClassInfo | None:
        """``version``'s out-of-class decision: its model card's threshold under ``--model-dir``, when its signature
        gives ``KNOWN_SCORE`` (``known``); None when it makes none (logged when only one of the two is there).
        Raises ValueError when the card's entry is unusable."""
        version_dir = self._s.model_dir / str(version)
        ood = read_out_of_class(version_dir) if version_dir.is_dir() else None
        if known and ood is None:
            log.warning("TF Serving version %d of %s gives %r but %s has no %r threshold: its predictions carry no "
                        "out-of-class decision", version, self._s.model_name, KNOWN_SCORE,
                        version_dir / "model_card.json", contract.MODEL_CARD_OOD)  # fmt: skip
        elif ood is not None and not known:
            log.warning("TF Serving version %d of %s has an %r threshold in its model card but its signature gives "
                        "no %r: its predictions carry no out-of-class decision", version, self._s.model_name,
                        contract.MODEL_CARD_OOD, KNOWN_SCORE)  # fmt: skip
            ood = None
        return ood

    def _remember(self, version: int, sig: _Signature, ood: OutOfClassInfo | None) -> None:
        """Keep what an accepted version gives: ``KNOWN_SCORE`` or not, and its decision's threshold."""
        if sig.known:
            self._known.add(version)
        else:
            self._known.discard(version)
        if ood is not None:
            self._out_of_class[version] = ood
        else:
            self._out_of_class.pop(version, None)

    def _read_labels(self, version: int, fallback: bool) -> tuple[str, ...]:
        """``--labels-file``, else ``<model_dir>/<version>/assets/labels.txt`` (with ``fallback``, the newest
        version's under --model-dir when that one is not there: the start, with a gateway of its own labels)."""
        s = self._s
        if s.labels_file is not None:
            return tuple(line.strip() for line in Path(s.labels_file).read_text().splitlines() if line.strip())
        local = find_versions(s.model_dir)
        pick = version if version in local else (local[-1] if local and fallback else None)
        if pick is None:
            raise ValueError(
                f"no {contract.LABELS_PATH} for version {version} under --model-dir {s.model_dir} (the model volume, "
                f"mounted read-only): the tfserving backend needs each version's class names, or --labels-file"
            )
        return read_labels(s.model_dir / str(pick))

    async def _verdict(self, r: Replica, version: int) -> str | None:
        """Why ``version`` must not be served (None: it may). Raises AioRpcError when ``r`` cannot be asked."""
        try:
            sig = await self._signature(r, version)
        except ValueError as exc:
            return str(exc)
        if sig.classes is not None and sig.classes != len(self._labels):
            return f"its signature gives {sig.classes} classes, the gateway serves {len(self._labels)}"
        if sig.top_k != self.top_k_width:
            return f"its top-k outputs are {sig.top_k} wide, the gateway's {self.top_k_width}"
        if self._s.labels_file is None:
            try:
                labels = self._read_labels(version, fallback=False)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                return f"its labels cannot be read: {exc}"
            if labels != self._labels:
                diff = next((i for i, (a, b) in enumerate(zip(labels, self._labels, strict=False)) if a != b),
                            min(len(labels), len(self._labels)))  # fmt: skip
                return (f"its {contract.LABELS_PATH} names other classes than the gateway serves ({len(labels)} "
                        f"against {len(self._labels)}, first difference at line {diff + 1})")  # fmt: skip
        try:
            ood = self._read_out_of_class(version, sig.known)
        except ValueError as exc:
            return f"its out-of-class entry cannot be used: {exc}"
        self._remember(version, sig, ood)
        return None

    # --- start -------------------------------------------------------------------------------------------------
    async def start(self) -> ModelDescription:
        """Wait for a replica with an AVAILABLE version, check its signature and labels, start following."""
        s = self._s
        give_up = self._clock() + s.tfserving_startup_timeout_s
        pause, said = 0.1, ""
        while True:
            await self._sync_replicas()
            await asyncio.gather(*(self._poll_replica(r) for r in self._replicas))
            serving = [r for r in self._replicas if r.up and r.versions]
            if serving:
                break
            anyone = any(r.up for r in self._replicas)
            errors = "; ".join(f"{r.address}: {r.error}" for r in self._replicas if r.error)
            why = (f"model {s.model_name!r} has no AVAILABLE version yet" if anyone
                   else f"no replica of {len(self._replicas)} answers GetModelStatus ({errors})")  # fmt: skip
            if why != said:
                log.info("waiting for TF Serving at %s: %s", s.tfserving_target, why)
                said = why
            if self._clock() + pause > give_up:
                raise RuntimeError(
                    f"TF Serving at {s.tfserving_target} did not report {s.model_name!r} AVAILABLE within "
                    f"tfserving_startup_timeout_s={s.tfserving_startup_timeout_s}: {why}"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        # The reference version: the label's, else the newest any replica serves.
        if s.tfserving_version_label and not any(r.labelled is not None for r in serving):
            raise ValueError(f"no TF Serving replica at {s.tfserving_target} knows the label "
                             f"{s.tfserving_version_label!r}")  # fmt: skip
        ref = max((r.labelled for r in serving if r.labelled is not None), default=None) or max(
            v for r in serving for v in r.versions
        )
        holder = next(r for r in serving if ref in r.versions)
        try:
            sig = await self._signature(holder, ref)
        except ValueError as exc:
            raise ValueError(f"TF Serving's {s.model_name!r} version {ref}: {exc}") from None
        self._labels = self._read_labels(ref, fallback=True)
        if sig.classes is not None and sig.classes != len(self._labels):
            raise ValueError(
                f"TF Serving's {s.model_name!r} outputs {sig.classes} classes but the labels name {len(self._labels)}"
            )
        self.top_k_width = sig.top_k
        self.signature_defs = sig.defs
        try:
            ood = self._read_out_of_class(ref, sig.known)
        except ValueError as exc:
            raise ValueError(f"TF Serving's {s.model_name!r} version {ref}: {exc}") from None
        self._remember(ref, sig, ood)
        self._verdicts[ref] = None
        await self._review()
        assert self._description is not None  # the reference version is accepted and served
        self._poller = asyncio.get_running_loop().create_task(self._follow(), name="tfserving-status")
        self._poller.add_done_callback(self._poller_done)
        log.info("TF Serving at %s (%d replicas) serves %s versions %s", s.tfserving_target, len(self._replicas),
                 s.model_name, list(self._description.versions))  # fmt: skip
        return self._description

    def _poller_done(self, task: asyncio.Task[None]) -> None:
        """The poller ended: expected when cancelled by close(); anything else is a death, reported."""
        if task.cancelled():
            return
        exc = task.exception()
        if self.on_failure is not None:
            self.on_failure("the TF Serving status poller", exc)
        else:
            log.error("the TF Serving status poller died; versions are no longer followed", exc_info=exc)

    # --- following versions ------------------------------------------------------------------------------------
    async def _follow(self) -> None:
        """Poll every replica; report changes in what is served."""
        while True:
            with contextlib.suppress(TimeoutError):  # a NOT_FOUND or a lost replica asks for an early look
                await asyncio.wait_for(self._refresh.wait(), self._s.tfserving_status_poll_s)
            await asyncio.sleep(MIN_POLL_GAP_S)
            self._refresh.clear()
            await self._sync_replicas()
            await asyncio.gather(*(self._poll_replica(r) for r in self._replicas))
            await self._review()

    async def _review(self) -> None:
        """Check versions seen for the first time, notice label disagreements, publish what is served."""
        m = self.metrics
        seen = {v for r in self._replicas if r.up for v in r.versions}
        for r in self._replicas:
            for v in r.versions:
                if not r.up or v in self._verdicts:
                    continue
                try:
                    verdict = await self._verdict(r, v)
                except grpc.aio.AioRpcError:
                    continue  # not asked: try again at the next poll; not routed to meanwhile
                self._verdicts[v] = verdict
                if verdict is None:
                    log.info("TF Serving version %d of %s checked on %s: accepted", v, self._s.model_name, r.address)
                else:
                    log.error("TF Serving version %d of %s is REFUSED (never routed to, never answered with): %s",
                              v, self._s.model_name, verdict)  # fmt: skip
                    if m is not None:
                        m.backend_versions_refused.inc()
        # A version no replica serves is forgotten: a new export under the same number is checked again.
        self._verdicts = {v: why for v, why in self._verdicts.items() if v in seen}
        self._accepted = frozenset(v for v, why in self._verdicts.items() if why is None)
        self._known &= self._accepted
        self._out_of_class = {v: ood for v, ood in self._out_of_class.items() if v in self._accepted}
        self._notice_labels()
        serving = [r for r in self._replicas if r.up and r.default(self._accepted) is not None]
        if m is not None:
            m.backend_replicas.labels("up").set(sum(r.up for r in self._replicas))
            m.backend_replicas.labels("serving").set(len(serving))
        if serving:
            versions = tuple(sorted({v for r in serving for v in r.versions if v in self._accepted}))
            default = max(d for r in serving if (d := r.default(self._accepted)) is not None)
            ood = {v: self._out_of_class[v] for v in versions if v in self._out_of_class}
            new: ModelDescription | None = ModelDescription(
                self._s.model_name, versions, self._labels, None if default == versions[-1] else default, ood,
                self._label_versions(serving),
            )
        else:
            new = None
        if new == self._description:
            return
        first = self._description is None and new is not None and self._poller is None
        self._description = new
        if new is None:
            log.warning("no TF Serving replica serves an accepted version of %s", self._s.model_name)
        elif not first:
            log.info("TF Serving now serves %s versions %s (default %d) on %d of %d replicas", self._s.model_name,
                     list(new.versions), new.default_version, len(serving), len(self._replicas))  # fmt: skip
        if not first and self.on_change is not None:
            self.on_change(new)

    def _label_versions(self, serving: list[Replica]) -> dict[str, int]:
        """Each watched label's version, as most serving replicas say (ties: the higher version), if accepted."""
        out = {}
        for label in sorted(self.watched_labels):
            said = Counter(v for r in serving if (v := r.labels.get(label)) is not None and v in self._accepted)
            if said:
                out[label] = max(said, key=lambda v: (said[v], v))
        return out

    def _notice_labels(self) -> None:
        """Replicas whose label points at different versions: logged and counted, health unchanged."""
        if not self._s.tfserving_version_label:
            return
        targets = sorted({r.labelled for r in self._replicas if r.up and r.labelled is not None})
        if len(targets) > 1:
            if self.metrics is not None:
                self.metrics.backend_label_disagreements.inc()
            where = ", ".join(f"{r.address}->{r.labelled}" for r in self._replicas if r.labelled is not None)
            self._lograte.log("label-disagreement", "TF Serving replicas disagree on label %r: %s (calls naming no "
                              "version are answered by each replica's own; health unchanged)",
                              self._s.tfserving_version_label, where)  # fmt: skip
        elif self._disagreeing:
            log.info("TF Serving replicas agree again on label %r: version %s", self._s.tfserving_version_label,
                     targets[0] if targets else "none")  # fmt: skip
        self._disagreeing = len(targets) > 1

    # --- batches -----------------------------------------------------------------------------------------------
    def predict(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None, attempts: int | None = None
    ) -> Awaitable[Answered]:
        """Send one batch now; the awaitable gives its probabilities and the version that answered, or raises a
        ServiceError. ``version`` may be ``ANY_VERSION``. ``attempts``: at most this many (shadow calls: 1, never
        retried); default ``tfserving_max_attempts``."""
        return self._run(images, version, deadline_s, [OUTPUT_KEY], self._probabilities, attempts)

    def predict_top_k(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> Awaitable[Answered]:
        """Send one batch now for its ``top_k_*`` outputs alone (``top_k_width`` classes a drawing, best first)."""
        return self._run(images, version, deadline_s, [TOP_K_SCORES, TOP_K_INDICES], self._top_k)

    def _timeout(self, deadline_s: float | None) -> float:
        timeout = self._s.backend_timeout_ms / 1000.0
        if deadline_s is not None:
            timeout = min(timeout, deadline_s - self._clock() - self._s.tfserving_deadline_margin_ms / 1000.0)
        if timeout <= 0:
            raise DeadlineExceeded("deadline exceeded before the batch reached TF Serving")
        return timeout

    def _pick(self, version: int, tried: list[Replica]) -> Replica | None:
        """The next replica, round robin, that can answer ``version`` (None: none left untried)."""
        accepted = self._accepted
        if version == ANY_VERSION:
            ok = [r for r in self._replicas if r.up and r not in tried and r.default(accepted) is not None]
        else:
            ok = [r for r in self._replicas if r.up and r not in tried and version in r.versions]
        if not ok:
            return None
        self._rr += 1
        return ok[self._rr % len(ok)]

    def _request(
        self, r: Replica, version: int, images: NDArray[np.uint8], outputs: list[str], known: bool = True
    ) -> tuple[Any, int]:
        """The PredictRequest for ``r``, and the version it names (``ANY_VERSION``: none or the label). It asks for
        ``KNOWN_SCORE`` too when the version expected to answer gives it: always when that version is named by
        number, and with ``known`` when it is not (versionless, or the label: another version may answer)."""
        sent = version
        expected = version
        label_it = False
        if version == ANY_VERSION:
            accepted = self._accepted
            label = self._s.tfserving_version_label
            expected = r.default(accepted) or ANY_VERSION
            if label and r.labelled is not None and r.labelled in accepted:
                label_it = True
                expected = r.labelled
            elif not accepted.issuperset(r.versions):  # its newest is refused (or not checked yet)
                sent = expected
        if expected in self._known and (known or sent != ANY_VERSION):
            outputs = [*outputs, KNOWN_SCORE]
        key = (tuple(outputs), sent, label_it, images.shape)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= MAX_REQUEST_TEMPLATES:
                self._templates.clear()
            template = self._templates[key] = tfs.PredictRequest(output_filter=outputs)
            spec = template.model_spec
            spec.name = self._s.model_name
            spec.signature_name = self._s.tfserving_signature
            if label_it:
                spec.version_label = self._s.tfserving_version_label or ""
            if sent != ANY_VERSION:
                spec.version.value = sent
            write_uint8(template.inputs[INPUT_KEY], images)
            template.inputs[INPUT_KEY].tensor_content = b""  # each request's own bytes go in its copy
        req = tfs.PredictRequest()
        req.CopyFrom(template)
        req.inputs[INPUT_KEY].tensor_content = np.ascontiguousarray(images, dtype=np.uint8).tobytes()
        return req, sent

    def _run(
        self,
        images: NDArray[np.uint8],
        version: int,
        deadline_s: float | None,
        outputs: list[str],
        parse: Callable[[Any, int], Any],
        attempts: int | None = None,
    ) -> Awaitable[Answered]:
        """Start the first attempt now; the coroutine retries as the module docstring says."""
        tried: list[Replica] = []
        first = self._attempt(version, images, outputs, deadline_s, tried)
        return self._complete(first, version, images, outputs, deadline_s, tried, len(images), parse, attempts)

    def _attempt(
        self, version: int, images: NDArray[np.uint8], outputs: list[str], deadline_s: float | None,
        tried: list[Replica], known: bool = True,
    ) -> tuple[Replica, Any, int]:
        """Start one Predict on the next replica that can answer it: (replica, call, version it names). ``known``:
        may ask for ``KNOWN_SCORE`` (see ``_request``)."""
        r = self._pick(version, tried)
        if r is None:
            if version == ANY_VERSION:
                raise Unavailable("no TF Serving replica is reachable with an accepted version; retry with backoff")
            if any(version in x.versions for x in self._replicas):
                raise Unavailable(f"no reachable TF Serving replica serves version {version}; retry with backoff")
            raise NotFound(f"no TF Serving replica serves version {version} of {self._s.model_name!r} now")
        tried.append(r)
        req, sent = self._request(r, version, images, outputs, known)
        return r, r.predict.Predict(req, timeout=self._timeout(deadline_s)), sent  # starts now

    def _retry(self, reason: str) -> bool:
        """May this batch try again (another attempt, within the budget)? Counts the retry."""
        if not self._budget.allows_retry():
            return False
        if self.metrics is not None:
            self.metrics.child(self.metrics.backend_retries, reason).inc()
        return True

    async def _complete(
        self,
        first: tuple[Replica, Any, int],
        version: int,
        images: NDArray[np.uint8],
        outputs: list[str],
        deadline_s: float | None,
        tried: list[Replica],
        n: int,
        parse: Callable[[Any, int], Any],
        most: int | None = None,
    ) -> Answered:
        r, call, sent = first
        attempts = 1
        max_attempts = self._s.tfserving_max_attempts if most is None else most
        known = True  # KNOWN_SCORE may be asked for (see _request); not after a replica said it has no such output
        while True:
            try:
                resp = await call
            except grpc.aio.AioRpcError as exc:
                self._budget.failed()
                code = exc.code()
                if overloaded(exc):
                    raise mapped(exc, _what(n, version)) from None  # never retried: the fleet is full, not this replica
                if known and sent == ANY_VERSION and lacks_known_score(exc):
                    # A version loaded since the last poll answered, without KNOWN_SCORE: ask again without it.
                    known = False
                    self._refresh.set()
                    if attempts >= max_attempts or not self._retry("unchecked_version"):
                        raise mapped(exc, _what(n, version)) from None
                    tried.remove(r)
                    r, call, sent = self._attempt(version, images, outputs, deadline_s, tried, known)
                    attempts += 1
                    continue
                if code == grpc.StatusCode.NOT_FOUND:
                    r.versions = tuple(v for v in r.versions if v != sent)  # until the next poll says otherwise
                    self._refresh.set()
                    reason = "not_found"
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    r.up = False  # until the next poll (asked for now) finds it again
                    self._refresh.set()
                    reason = "unavailable"
                else:
                    raise mapped(exc, _what(n, version)) from None
                if attempts >= max_attempts or not self._retry(reason):
                    raise mapped(exc, _what(n, version)) from None
                try:
                    r, call, sent = self._attempt(version, images, outputs, deadline_s, tried, known)
                except NotFound:
                    raise mapped(exc, _what(n, version)) from None  # no other replica lists it: the caller's NOT_FOUND
                attempts += 1
                continue
            answered = int(resp.model_spec.version.value) or sent
            if answered in self._accepted:
                self._budget.succeeded()
                return Answered(parse(resp, n), answered, self._known_score(resp, n))
            # Answered by a version not accepted (refused, or new since the last poll): never passed on. Listed on
            # the replica until the next poll says otherwise, so the next attempt there names an accepted version
            # by number (_request) instead of getting the same answer again.
            self._refresh.set()
            r.versions = tuple(sorted({*r.versions, answered}))
            if attempts >= max_attempts or not self._retry("unchecked_version"):
                raise Unavailable(f"TF Serving answered {_what(n, version)} with version {answered}, which this "
                                  "gateway has not accepted (yet); retry with backoff")  # fmt: skip
            tried.remove(r)  # the same replica may answer again, by number
            r, call, sent = self._attempt(version, images, outputs, deadline_s, tried, known)
            attempts += 1

    def _known_score(self, resp: Any, n: int) -> NDArray[np.float32] | None:
        """The answer's ``KNOWN_SCORE``, float32 [n], when it has one (None: not asked for, or not given)."""
        if KNOWN_SCORE not in resp.outputs:
            return None
        known = _output(resp, KNOWN_SCORE, tfs.DT_FLOAT, (n,)).astype(np.float32, copy=False)
        if known.shape != (n,):
            raise BackendError(f"TF Serving returned {KNOWN_SCORE!r} of shape {list(known.shape)} for {n} drawings")
        return known

    def _top_k(self, resp: Any, n: int) -> TopK:
        outputs = resp.outputs
        shape = (n, self.top_k_width)
        for key in (TOP_K_SCORES, TOP_K_INDICES):
            if key not in outputs:
                raise BackendError(f"TF Serving's answer has no {key!r} output: {sorted(outputs)}")
        scores = _output(resp, TOP_K_SCORES, tfs.DT_FLOAT, shape)
        indices = _output(resp, TOP_K_INDICES, tfs.DT_INT32, shape)
        classes = len(self._labels)
        if scores.shape != shape or indices.shape != shape or indices.dtype.kind not in "iu":
            raise BackendError(f"TF Serving returned top-k outputs of shapes {list(scores.shape)} and "
                               f"{list(indices.shape)} for {n} drawings of {self.top_k_width}")  # fmt: skip
        if indices.size and not _in_range(indices, classes):
            raise BackendError(f"TF Serving returned class indices outside 0..{classes - 1}")
        return TopK(scores.astype(np.float32, copy=False), indices)

    def _probabilities(self, resp: Any, n: int) -> NDArray[np.float32]:
        if OUTPUT_KEY not in resp.outputs:
            raise BackendError(f"TF Serving's answer has no {OUTPUT_KEY!r} output: {sorted(resp.outputs)}")
        probs = _output(resp, OUTPUT_KEY, tfs.DT_FLOAT, (n, len(self._labels))).astype(np.float32, copy=False)
        if probs.ndim != 2 or len(probs) != n or probs.shape[1] != len(self._labels):
            raise BackendError(f"TF Serving returned {OUTPUT_KEY!r} of shape {list(probs.shape)} for {n} drawings "
                               f"of {len(self._labels)} classes")  # fmt: skip
        return probs

    async def close(self) -> None:
        """Stop following versions and close the channels."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for r in self._replicas:
            await r.channel.close()


def _output(resp: Any, key: str, dtype: int, shape: tuple[int, ...]) -> NDArray[Any]:
    """The answer's output ``key`` (present), decoded: cheaply when it is the ``dtype`` and ``shape`` expected, as
    TF Serving sends them; otherwise in full, a BackendError when it cannot be (its shape is the caller's check)."""
    tensor = resp.outputs[key]
    array = exact(tensor, dtype, shape)
    if array is None:
        try:
            array = to_numpy(tensor)
        except TensorDecodeError as exc:
            raise BackendError(f"TF Serving's {key!r} could not be decoded: {exc}") from None
    return array


def _in_range(indices: NDArray[np.integer], classes: int) -> bool:
    """Every index in 0..classes-1: in Python for a few (a numpy reduction costs more than its work there), else one
    reduction (read as unsigned, a negative index is larger than any class)."""
    if indices.size <= 64:
        flat = indices.ravel().tolist()
        return min(flat) >= 0 and max(flat) < classes
    unsigned = indices if indices.dtype.kind == "u" else indices.view(f"u{indices.dtype.itemsize}")
    return bool(unsigned.max() < classes)
