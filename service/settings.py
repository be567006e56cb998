"""The gateway's settings: one validated, frozen pydantic-settings tree with units in the field names.

Every field can be set as an environment variable with the ``QUICKDRAW_`` prefix (``QUICKDRAW_GRPC_PORT=50052``)
or as a ``quickdraw serve`` option (``--grpc-port 50052``); the option wins. Each field's description is
its ``--help`` text, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from doodle.contract import SIGNATURE_NAME
from quickdraw_client.security import TOKEN_ENV, read_token_file, valid_token

ENV_PREFIX = "QUICKDRAW_"
MiB = 1024 * 1024
_SECTION = re.compile(r"^\s*# --- (.+?) -+\s*$")
_FIELD = re.compile(r"^    ([a-z][a-z0-9_]*): ")


def setting_sections() -> dict[str, str]:
    """Each setting's section ("listening", "request limits", ...), from the ``# --- name ---`` comments that group
    the fields below, in source order: ``quickdraw serve --help`` and the configuration reference group by them."""
    section, out = "other", {}
    for line in Path(__file__).read_text().splitlines():
        if m := _SECTION.match(line):
            section = m.group(1)
        elif m := _FIELD.match(line):
            out.setdefault(m.group(1), section)
    return out


#: The shortest token the gateway accepts in its configuration (a short token can be guessed).
MIN_TOKEN_CHARS = 16


def strong_token(token: str, what: str) -> str:
    """``token`` if it is valid and at least ``MIN_TOKEN_CHARS`` long; the error gives lengths, never the token."""
    valid_token(token, what)
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{what} is too short: a token needs at least {MIN_TOKEN_CHARS} characters "
                         f"({len(token)} given); generate one with: openssl rand -hex 32")  # fmt: skip
    return token


class Settings(BaseSettings):
    """Everything the gateway can be told; see ``quickdraw serve --help``."""

    # hide_input_in_errors: a validation error never quotes the values given (QUICKDRAW_AUTH_TOKEN among them)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", hide_input_in_errors=True)

    # --- listening -------------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address to bind the gRPC and HTTP servers to")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    http_port: int = Field(
        8080, ge=0, le=65535, description="HTTP port for /metrics, the JSON API and the playground (0 picks a free one)"
    )
    http_api: bool = Field(
        True, description="serve the JSON API (/v1/classify, /v1/model) and the playground page (/) on the HTTP port"
    )
    reflection: bool = Field(True, description="enable gRPC server reflection (grpcurl, grpcui)")
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="largest gRPC message accepted, in bytes")
    max_connection_age_s: float = Field(
        300.0,
        ge=0.0,
        description="close client connections after this long (clients reconnect, so long-lived ones rebalance "
        "across gateway replicas behind a Kubernetes Service); 0 never closes them",
    )
    max_connection_age_grace_s: float = Field(
        30.0, ge=0.0, description="how long calls on a connection closed for its age may still take"
    )
    grpc_request_compression: bool = Field(
        False,
        description="accept gzip/deflate-compressed gRPC requests; off by default, so a request costs its sender "
        "its full size on the wire (4 KB of gzip can be 4 MiB of empty drawings); compressed calls are refused "
        "by gRPC itself with UNIMPLEMENTED before any byte is decompressed",
    )
    grpc_handshake_timeout_s: float = Field(
        10.0, gt=0.0, description="close a gRPC connection that has not finished its handshake (TLS and HTTP/2 "
        "settings) within this time: silent TCP connections do not hold file descriptors",
    )  # fmt: skip
    grpc_max_connection_idle_s: float = Field(
        120.0, ge=0.0, description="close a gRPC connection with no call in flight for this long (clients reconnect "
        "on their next call); 0 never closes idle connections",
    )  # fmt: skip
    max_grpc_connections: int = Field(
        2000, ge=1, description="most open gRPC connections; beyond it new connections are closed at once "
        "(kept below the file-descriptor limit, see docs/security.md)",
    )  # fmt: skip
    grpc_max_streams_per_connection: int = Field(
        1000, ge=1, description="most calls in flight on one gRPC connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS); "
        "clients queue calls beyond it"
    )
    max_concurrent_rpcs: int = Field(
        4000, ge=1, description="most gRPC calls in flight in the whole server, health checks included; beyond it "
        "gRPC answers RESOURCE_EXHAUSTED at once",
    )  # fmt: skip
    max_open_streams: int = Field(
        1000, ge=1, description="most streams open at once, ClassifyStream and the OIP's ModelStreamInfer together; "
        "beyond it a new stream gets RESOURCE_EXHAUSTED, leaving room under max_concurrent_rpcs for unary calls and "
        "health checks",
    )  # fmt: skip
    http_keepalive_timeout_s: float = Field(
        15.0, gt=0.0, description="close an HTTP connection that has been idle this long between requests"
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="close an HTTP connection that has not sent a request's complete headers this long after it "
        "opened or after the request's first byte (slowloris)",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0.0,
        description="answer 408 and close the connection when a JSON API request's body has not fully arrived this "
        "long after its headers (a chunked body that never ends, a Content-Length larger than what is sent)",
    )
    max_http_connections: int = Field(
        1000,
        ge=1,
        description="most HTTP connections open at once (kept below the process's file-descriptor limit); beyond "
        "it the longest-idle connection is closed to make room, or the new one when none is idle",
    )
    http_request_compression: bool = Field(
        False,
        description="accept JSON API request bodies with Content-Encoding gzip or deflate (decompressed up to the "
        "body limit); off, such bodies are refused with 415 before they are read",
    )
    http_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("localhost", "127.0.0.1", "[::1]"),
        description="comma-separated host names (any port) the HTTP port answers in the Host and Origin headers "
        "when no bearer token is set (a guard against DNS rebinding and cross-site requests from browsers); "
        "* allows any; /metrics is exempt",
    )
    tfserving_api: bool = Field(
        True,
        description="also serve TF Serving's own gRPC API (PredictionService Predict and GetModelMetadata, "
        "ModelService GetModelStatus), so existing TF Serving clients can point at the gateway",
    )

    # --- model and backend -----------------------------------------------------------------------------------
    backend: Literal["embedded", "tfserving"] = Field(
        "embedded",
        description="embedded: the SavedModel in-process; tfserving: call TensorFlow Serving over gRPC at "
        "--tfserving-target",
    )
    model_dir: Path = Field(
        Path("models/quickdraw"), description="model base directory holding integer version folders"
    )
    model_name: str = Field("quickdraw", description="model name reported to clients (and asked of TF Serving)")
    model_versions: Literal["latest", "all"] = Field(
        "latest", description="embedded backend: load only the highest version, or every version found"
    )
    inference_threads: int = Field(
        0, ge=0, description="embedded backend: TensorFlow intra-op threads per batch (0: TensorFlow decides)"
    )
    warmup: bool = Field(True, description="run warm-up batches before reporting SERVING")
    model_watch_s: float = Field(
        2.0,
        ge=0.0,
        description="embedded backend: how often to look for a new version under --model-dir and move to it "
        "(loaded and warmed up beside the served one, as TF Serving does); 0 never looks",
    )
    model_retire_s: float = Field(
        30.0, ge=0.0, description="embedded backend: how long a replaced version stays loaded for calls queued to it"
    )
    labels_file: Path | None = Field(
        None,
        description="class names, one a line, in output order (default: assets/labels.txt of the served version "
        "under --model-dir); the tfserving backend needs one of the two",
    )

    # --- TF Serving backend -----------------------------------------------------------------------------------
    tfserving_target: str = Field(
        "localhost:8500",
        description="TF Serving replicas: ipv4:a:port,b:port lists them; dns:///<headless-service>:8500 resolves "
        "to every pod, again at every status poll; the gateway balances batches over them and follows each "
        "replica's versions (anything else is one replica)",
    )
    tfserving_deadline_margin_ms: float = Field(
        20.0,
        ge=0.0,
        description="taken off each caller's remaining deadline before it goes to TF Serving, to cover the "
        "network hops, so that TF Serving gives up no later than the caller",
    )
    tfserving_signature: str = Field(SIGNATURE_NAME, description="signature asked of TF Serving")
    tfserving_version_label: str | None = Field(
        None,
        description="serve calls that name no version from the version this TF Serving label points at (e.g. "
        "stable), resolved with GetModelMetadata at start and at every status poll; default: the highest version",
    )
    tfserving_max_attempts: int = Field(
        3, ge=1, le=5,
        description="attempts per backend batch over the replicas: a lost replica (UNAVAILABLE) or a version it "
        "no longer has (NOT_FOUND) is retried on another one; TF Serving's full queue never is",
    )
    tfserving_retry_max_tokens: int = Field(
        10, gt=0, le=1000,
        description="retry budget (gRPC retryThrottling maxTokens): each failed backend attempt takes a token, "
        "and retries stop while half or fewer are left",
    )
    tfserving_retry_token_ratio: float = Field(
        0.1, gt=0.0, le=1.0, description="tokens a successful backend attempt gives back (retryThrottling tokenRatio)"
    )
    tfserving_initial_backoff_ms: float = Field(50.0, gt=0.0, description="first retry backoff")
    tfserving_max_backoff_ms: float = Field(500.0, gt=0.0, description="longest retry backoff")
    tfserving_reconnect_backoff_ms: float = Field(
        1000.0, gt=0.0, description="longest wait between reconnection attempts to a TF Serving replica that is down"
    )
    tfserving_keepalive_s: float = Field(
        30.0, gt=0.0, description="keepalive ping interval on the TF Serving channel (finds dead peers)"
    )
    tfserving_status_poll_s: float = Field(
        2.0, gt=0.0, description="how often to ask TF Serving which versions are AVAILABLE (readiness follows it)"
    )
    tfserving_startup_timeout_s: float = Field(
        300.0, gt=0.0, description="how long to wait at start for TF Serving to report the model AVAILABLE"
    )

    # --- dynamic batching -------------------------------------------------------------------------------------
    max_batch_size: int = Field(128, ge=1, le=4096, description="most drawings in one backend batch")
    max_batch_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=10_000.0,
        description="how long a batch may wait for more drawings once a backend slot is free; 0 dispatches at "
        "once (drawings still merge while every slot is busy)",
    )
    max_concurrent_batches: int = Field(
        1,
        ge=1,
        le=256,
        description="backend batches in flight at once; 1 suits the embedded backend on CPU, where TensorFlow "
        "already spreads one batch over every core; raise it for remote backends with several replicas",
    )
    max_queued_drawings: int = Field(
        4096, ge=1, description="drawings waiting for the backend; beyond this calls get RESOURCE_EXHAUSTED"
    )
    max_queue_wait_ms: float = Field(
        250.0,
        ge=0.0,
        description="refuse a call at once (RESOURCE_EXHAUSTED) when the drawings queued ahead of it would keep the "
        "backend busy longer than this (estimated from recent batches); 0 turns this off",
    )
    backend_timeout_ms: float = Field(
        10_000.0, gt=0.0, description="deadline for one backend batch (TF Serving call or in-process run)"
    )
    backend_wedged_after_timeouts: int = Field(
        3,
        ge=1,
        description="consecutive backend timeouts (a batch still running counts again every backend_timeout_ms) "
        "after which health reports NOT_SERVING, and liveness too while a timed-out batch has not returned",
    )

    # --- request limits ---------------------------------------------------------------------------------------
    max_drawings_per_request: int = Field(256, ge=1, description="most drawings in one Classify call")
    max_top_k: int = Field(20, ge=1, description="largest top_k a request may ask for")
    max_strokes: int = Field(256, ge=1, description="most strokes in one drawing")
    max_points: int = Field(8192, ge=1, description="most points in one drawing, all strokes together")
    max_raw_coordinate: float = Field(1.0e6, gt=0.0, description="largest absolute raw stroke coordinate")
    max_image_bytes: int = Field(2 * MiB, ge=1, description="largest encoded PNG/JPEG, in bytes")
    max_image_pixels: int = Field(
        4 * MiB,
        ge=1,
        description="largest decoded image, width x height in pixels, read from the header before decoding (the "
        "model sees 28x28; 4 Mi is 2048 x 2048)",
    )
    max_jpeg_scans: int = Field(
        32, ge=1, description="most scans in a JPEG (a progressive one has about 10), counted before decoding"
    )
    image_decode_budget_ms: float = Field(
        500.0,
        gt=0.0,
        description="longest one image may take to decode (in a worker process, killed and replaced past it); "
        "the caller's deadline cuts it shorter",
    )
    image_decode_workers: int = Field(2, ge=1, description="worker processes that decode images")
    stroke_render_budget_ms: float = Field(
        2000.0,
        gt=0.0,
        description="longest one drawing's strokes may take to simplify and render (in a worker process, killed and "
        "replaced past it; the largest legal drawing takes about 350 ms on one core); the caller's deadline cuts it "
        "shorter",
    )
    stroke_render_workers: int = Field(
        2,
        ge=0,
        description="worker processes that render strokes (off the gateway's GIL, which the event loop needs); 0: "
        "render on the preprocessing threads",
    )
    preprocess_threads: int = Field(2, ge=1, description="threads that decode images and render strokes")
    json_parse_workers: int = Field(
        1, ge=1, description="worker processes that parse JSON API bodies over 1 MiB (json.loads would hold the "
        "GIL, and stall the event loop, for ~12 ms per MiB)")
    max_preprocessing_calls: int = Field(
        16, ge=1, description="most calls validated and rendered at once, running on or waiting for the "
        "preprocessing threads; beyond it a call is refused at once with RESOURCE_EXHAUSTED")

    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the event loop the gateway runs on: uvloop (libuv; about 2% less CPU per gRPC "
        "call than asyncio's own loop in bench_cpu, see BENCHMARKS.md) or asyncio's own loop")

    # --- roll-outs (canary split, shadow comparison) -----------------------------------------------------------
    canary_split: str | None = Field(
        None,
        description="weighted split of calls that name no version, as target=weight pairs: versions (1=90,2=10) "
        "or TF Serving version labels (stable=95,canary=5); a caller sending --routing-key-header stays on one "
        "side; default: no split",
    )
    shadow_version: str | None = Field(
        None,
        description="candidate (a version or a TF Serving label) that --shadow-fraction of calls are also sent "
        "to, off the caller's path, to compare its answers with the stable version's (quickdraw_shadow_* metrics, "
        "quickdraw rollout status)",
    )
    shadow_fraction: float = Field(0.1, ge=0.0, le=1.0, description="share of calls shadowed to --shadow-version")
    shadow_max_queued_drawings: int = Field(
        512, ge=1, description="drawings waiting for the shadow candidate; beyond this shadow work is dropped "
        "(counted), never the caller's",
    )  # fmt: skip
    shadow_max_concurrent_calls: int = Field(
        4, ge=1, le=64, description="shadow calls to the candidate in flight at once (each one shadowed call, as its "
        "caller sent it)",
    )  # fmt: skip
    rollout_file: Path | None = Field(
        None,
        description="JSON roll-out plan ({\"split\": {\"1\": 90, \"2\": 10}, \"shadow\": {\"target\": \"2\", "
        "\"fraction\": 0.5}}), read at start and again whenever it changes (quickdraw rollout promote|abort "
        "writes it); it replaces --canary-split and --shadow-version while it exists",
    )
    rollout_watch_s: float = Field(
        2.0, ge=0.0, description="how often to look for a change of --rollout-file; 0 reads it at start only"
    )
    routing_key_header: str = Field(
        "x-routing-key", pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        description="gRPC metadata key / HTTP header whose value keeps one caller on one side of the canary split",
    )  # fmt: skip

    # --- logging ----------------------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None,
        description="log level of every logger (gateway, gRPC, aiohttp); default: INFO for the gateway's own lines, "
        "WARNING for libraries (or as quickdraw -v/-vv sets it). Tokens and raw header lines are never logged",
    )

    # --- lifecycle --------------------------------------------------------------------------------------------
    shutdown_grace_s: float = Field(
        10.0, ge=0.0, description="on SIGTERM, how long in-flight calls may take to finish before exit"
    )

    # --- security (service/security/) -----------------------------------------------------------------------
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain for the gRPC port; with --tls-key-file the port speaks only TLS "
        "(plaintext is refused)",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of --tls-cert-file")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA certificates: when set, gRPC callers must present a client certificate signed by one of "
        "them (mTLS), and so must JSON API callers (needs --http-tls, or --no-http-api)",
    )
    http_tls: bool = Field(
        False,
        description="serve the HTTP port (metrics, JSON API, playground) over TLS with --tls-cert-file and "
        "--tls-key-file; /metrics never needs a client certificate",
    )
    auth_token_file: Path | None = Field(
        None,
        description="file holding the bearer token callers must send ('authorization: Bearer <token>'), one per "
        "line (several are accepted, for rotation); or give one token in the environment variable "
        f"{ENV_PREFIX}AUTH_TOKEN. grpc.health.v1 and /metrics are exempt",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="the bearer token callers must send; from the environment only, never an option",
        json_schema_extra={"env_only": True},
    )
    auth_exempt_reflection: bool = Field(
        False, description="with a token set, let server reflection answer without one (otherwise it needs it too)"
    )
    allow_plaintext_http_token: bool = Field(
        False,
        description="with a token and TLS on gRPC, still serve the JSON API on plaintext HTTP, where the same token "
        "travels unencrypted (refused at start unless set; prefer --http-tls or --no-http-api)",
    )
    tfserving_tls: bool = Field(
        False,
        description="call TF Serving over TLS (implied by any --tfserving-tls-* setting); without "
        "--tfserving-tls-ca-file the system's root CAs verify its certificate",
    )
    tfserving_tls_ca_file: Path | None = Field(None, description="PEM CA certificates that TF Serving's certificate "
                                               "must be signed by")  # fmt: skip
    tfserving_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate the gateway presents to TF Serving (mTLS), with its key file"
    )
    tfserving_tls_key_file: Path | None = Field(None, description="PEM private key of --tfserving-tls-cert-file")
    tfserving_tls_server_name: str | None = Field(
        None,
        description="name to verify in TF Serving's certificate instead of the target's host (e.g. when "
        "dialing dns:///<headless-service>:8500)",
    )

    @property
    def tfserving_uses_tls(self) -> bool:
        """Whether the channel to TF Serving is TLS."""
        return bool(self.tfserving_tls or self.tfserving_tls_ca_file or self.tfserving_tls_cert_file
                    or self.tfserving_tls_key_file or self.tfserving_tls_server_name)  # fmt: skip

    @field_validator("http_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        """A comma-separated string (environment variable or option) as a tuple of lower-case names."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            value = tuple(str(v).strip().lower() for v in value if str(v).strip())
            if not value:
                raise ValueError("give at least one host name, or * for any")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> Settings:
        pairs = (("tls_cert_file", "tls_key_file"), ("tfserving_tls_cert_file", "tfserving_tls_key_file"))
        for a, b in pairs:
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ValueError(f"{a} and {b} go together: give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs TLS: give tls_cert_file and tls_key_file too")
        if self.http_tls and self.tls_cert_file is None:
            raise ValueError("http_tls needs tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.http_api and not self.http_tls:
            raise ValueError(
                "tls_client_ca_file requires client certificates on gRPC, but the JSON API on the plaintext HTTP "
                "port could not ask for them: set http_tls (the API then requires them too) or turn http_api off"
            )
        if self.auth_token_file is not None and self.auth_token is not None:
            raise ValueError(f"give the token in auth_token_file or in {ENV_PREFIX}AUTH_TOKEN, not both")
        if self.auth_token is not None and not self.auth_token.get_secret_value().strip():
            raise ValueError(f"{ENV_PREFIX}AUTH_TOKEN is set but empty")
        has_token = self.auth_token_file is not None or self.auth_token is not None
        if (has_token and self.tls_cert_file is not None and self.http_api and not self.http_tls
                and not self.allow_plaintext_http_token):  # fmt: skip
            raise ValueError(
                "a bearer token with TLS on gRPC, but the JSON API on the plaintext HTTP port accepts the same token "
                "unencrypted: set http_tls (the HTTP port then uses the gRPC certificate), turn http_api off, or set "
                "allow_plaintext_http_token to accept it"
            )
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file",
                     "tfserving_tls_ca_file", "tfserving_tls_cert_file", "tfserving_tls_key_file"):  # fmt: skip
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: no such file: {path}")
        self.tokens()  # readable, and each token at least MIN_TOKEN_CHARS long (never shown)
        return self

    def tokens(self) -> list[str]:
        """The server's bearer tokens: those of ``auth_token_file`` or of ``QUICKDRAW_AUTH_TOKEN`` (none when
        neither is set), each at least ``MIN_TOKEN_CHARS`` long (ValueError otherwise, naming the setting, never
        the token)."""
        if self.auth_token_file is not None:
            path = self.auth_token_file
            return [strong_token(t, f"auth_token_file {path} token {i}")
                    for i, t in enumerate(read_token_file(path, "auth_token_file"), 1)]  # fmt: skip
        if self.auth_token is not None:
            return [strong_token(self.auth_token.get_secret_value().strip(), TOKEN_ENV)]
        return []

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.max_queued_drawings < self.max_drawings_per_request:
            raise ValueError(
                f"max_queued_drawings ({self.max_queued_drawings}) must be at least max_drawings_per_request "
                f"({self.max_drawings_per_request}), or a full-size call could never be queued"
            )
        if self.max_open_streams >= self.max_concurrent_rpcs:
            raise ValueError(
                f"max_open_streams ({self.max_open_streams}) must be below max_concurrent_rpcs "
                f"({self.max_concurrent_rpcs}), or open streams could refuse every health check"
            )
        if self.max_image_bytes > self.max_message_bytes:
            raise ValueError(
                f"max_image_bytes ({self.max_image_bytes}) cannot exceed max_message_bytes ({self.max_message_bytes})"
            )
        return self
