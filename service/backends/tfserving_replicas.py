"""TF Serving's replicas as the TF Serving backend sees them: which ones a ``tfserving_target`` names (static
lists, or a headless Service's DNS name resolved at every poll), each replica's channel (bounded, throttled
retries for the status calls, keepalive, message sizes, reconnect backoff) and last known status, the retry
budget (gRFC A6's ``retryThrottling``) for the retries the backend makes itself, and TF Serving's failures as the
errors a caller gets. ``service.backends.tfserving`` routes batches over them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import grpc

from doodle import contract
from service.core.errors import BackendError, DeadlineExceeded, NotFound, ResourceExhausted, ServiceError, Unavailable
from service.protos import tfs
from service.settings import Settings

log = logging.getLogger(__name__)

#: The output a version may give besides the probabilities (its out-of-class score).
KNOWN_SCORE = contract.KNOWN_SCORE


def retry_throttling(settings: Settings) -> dict[str, int | float]:
    """The ``retryThrottling`` of a gRPC service config (gRFC A6), from the settings."""
    return {"maxTokens": settings.tfserving_retry_max_tokens, "tokenRatio": settings.tfserving_retry_token_ratio}


def channel_options(settings: Settings) -> list[tuple[str, object]]:
    """One replica's channel: bounded, throttled retries of UNAVAILABLE for the status calls only (Predict is
    retried by the backend itself, on another replica, and never when TF Serving's queue is full), keepalive,
    message sizes, reconnect backoff."""
    service_config = {
        "methodConfig": [
            {
                "name": [{"service": tfs.MODEL_SERVICE},
                         {"service": tfs.PREDICTION_SERVICE, "method": "GetModelMetadata"}],
                "retryPolicy": {
                    "maxAttempts": max(2, settings.tfserving_max_attempts),
                    "initialBackoff": f"{settings.tfserving_initial_backoff_ms / 1000:.3f}s",
                    "maxBackoff": f"{settings.tfserving_max_backoff_ms / 1000:.3f}s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": retry_throttling(settings),
    }  # fmt: skip
    reconnect_ms = int(settings.tfserving_reconnect_backoff_ms)
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1 if settings.tfserving_max_attempts > 1 else 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.tfserving_keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, reconnect_ms)),
        ("grpc.max_reconnect_backoff_ms", reconnect_ms),
    ]


# --- which replicas ---------------------------------------------------------------------------------------------


def _host_port(spec: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` as (host, port)."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if spec.count(":") == 1:
        host, port = spec.split(":")
        return host, int(port)
    return spec, default_port


class Targets:
    """The replicas a ``tfserving_target`` names (see the module docstring)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._static: list[str] | None = None
        self._dns: tuple[str, int] | None = None
        if target.startswith(("ipv4:", "ipv6:")):
            scheme, _, rest = target.partition(":")
            self._static = [f"{scheme}:{a.strip()}" for a in rest.split(",") if a.strip()]
        elif target.startswith("dns:"):
            rest = target[len("dns:"):]
            if rest.startswith("//"):
                rest = rest[2:].partition("/")[2]  # dns://authority/host:port: the authority is a DNS server
            self._dns = _host_port(rest, 443)  # gRPC's default port for dns: targets
        else:
            self._static = [target]

    @property
    def authority(self) -> str | None:
        """The name TLS checks and ``:authority`` carries for resolved addresses (the DNS name)."""
        return f"{self._dns[0]}:{self._dns[1]}" if self._dns else None

    async def addresses(self) -> list[str]:
        """Every replica's address now (a dns: target is resolved; raises OSError when it cannot be)."""
        if self._static is not None:
            return list(self._static)
        assert self._dns is not None
        host, port = self._dns
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        out: list[str] = []
        for family, _, _, _, sockaddr in infos:
            address = f"ipv6:[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"ipv4:{sockaddr[0]}:{port}"
            if address not in out:
                out.append(address)
        return out


@dataclass(eq=False)
class Replica:
    """One TF Serving replica, as the last status poll saw it."""

    address: str
    channel: grpc.aio.Channel
    predict: Any
    models: Any
    #: AVAILABLE versions, ascending.
    versions: tuple[int, ...] = ()
    #: The version ``tfserving_version_label`` points at on this replica (None: no label, or not known here).
    labelled: int | None = None
    #: The version each watched label (a roll-out plan's targets) points at here; labels it does not know are absent.
    labels: dict[str, int] = field(default_factory=dict)
    #: It answered its last status poll, and no Predict has found it unreachable since.
    up: bool = False
    #: Why its last status poll failed ("CODE: details"; empty when it answered).
    error: str = ""

    def default(self, accepted: set[int] | frozenset[int]) -> int | None:
        """The version a call naming none gets here: the label's if accepted, else the highest accepted one."""
        if self.labelled is not None and self.labelled in accepted and self.labelled in self.versions:
            return self.labelled
        for v in reversed(self.versions):  # the last accepted one, with no list built (twice per Predict)
            if v in accepted:
                return v
        return None


class RetryBudget:
    """gRPC's ``retryThrottling`` rule (gRFC A6) for the retries this backend makes itself."""

    def __init__(self, max_tokens: float, token_ratio: float) -> None:
        self.max_tokens, self.token_ratio = max_tokens, token_ratio
        self.tokens = max_tokens

    def failed(self) -> None:
        """An attempt failed: one token less."""
        self.tokens = max(0.0, self.tokens - 1.0)

    def succeeded(self) -> None:
        """An attempt succeeded: ``token_ratio`` back."""
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows_retry(self) -> bool:
        """Retries are allowed while more than half the tokens are left."""
        return self.tokens > self.max_tokens / 2


def overloaded(exc: grpc.aio.AioRpcError) -> bool:
    """TF Serving refused the work because its batching queue is full (TensorFlow's shared batch scheduler
    answers UNAVAILABLE "The batch scheduling queue to which this task was submitted is full"; a server may
    say RESOURCE_EXHAUSTED too)."""
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return True
    detail = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and "queue" in detail and "full" in detail


def lacks_known_score(exc: grpc.aio.AioRpcError) -> bool:
    """TF Serving refused an ``output_filter`` naming ``KNOWN_SCORE``: the version that ran has no such output
    (predict_util.cc ``PreProcessPrediction``: "output tensor alias not found in signature: <alias> ...")."""
    detail = exc.details() or ""
    return exc.code() == grpc.StatusCode.INVALID_ARGUMENT and f"alias not found in signature: {KNOWN_SCORE}" in detail


def mapped(exc: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """A TF Serving failure as the error our caller gets."""
    code, detail = exc.code(), exc.details() or ""
    if overloaded(exc):
        return ResourceExhausted(f"TF Serving is overloaded ({what}): {detail}; retry with backoff")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TF Serving is unavailable ({what}): {detail}; retry with backoff")
    if code == grpc.StatusCode.CANCELLED:  # not by us (our callers' cancellations never get here): it went away
        return Unavailable(f"TF Serving cancelled the call, shutting down or restarting ({what}); retry with backoff")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for TF Serving ({what})")
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"TF Serving does not serve it ({what}): {detail}")
    return BackendError(f"TF Serving failed ({what}): {code.name}: {detail}")
