"""Security, end to end: TLS and mTLS on the gateway's ports and on its channel to TF Serving, bearer tokens,
and logs that hold neither drawings nor secrets.

Every certificate is generated here (``cryptography``): a CA, a server certificate for localhost/127.0.0.1,
a client certificate from that CA, a client certificate from a second ("rogue") CA, and a TF Serving
certificate valid only for ``tfserving.internal``. The gateway is the real ``App`` on free ports
(tests/harness.py); TF Serving is the stand-in (tests/tfserving_standin.py) given server credentials.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import ipaddress
import json
import logging
import os
import secrets
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from harness import ROOT, SHIPPED_MODEL, RunningGateway
from PIL import Image, PngImagePlugin
from pydantic import ValidationError
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from doodle.formats import open_bitmaps
from quickdraw_client.security import ClientSecurity
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import find_versions
from service.client import QuickDrawClient
from service.core.metrics import Metrics
from service.protos.tensors import from_numpy
from service.security.redaction import install_log_redaction
from service.security.tokens import AuthFailureLog, TokenAuth, TokenRefused
from service.settings import MIN_TOKEN_CHARS, Settings

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "quickdraw"


# --- a throwaway PKI ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca``, ``server``/``server_key``, ``client``/``client_key``, ``rogue_ca``,
    ``rogue_client``/``rogue_client_key``, ``tfs``/``tfs_key`` (valid for tfserving.internal only)."""

    dir: Path

    def __getattr__(self, name: str) -> Path:
        return self.dir / f"{name}.pem"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))  # fmt: skip


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def issue(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str, *, server: bool, names: tuple[str, ...] = ()
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )  # fmt: skip
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = make_ca("quickdraw test CA"), make_ca("rogue CA")
    _write_cert(d / "ca.pem", ca[1])
    _write_cert(d / "rogue_ca.pem", rogue[1])
    for name, parent, cn, server, names in (
        ("server", ca, "localhost", True, ("localhost", "127.0.0.1")),
        ("client", ca, "backend-team-a", False, ()),
        ("rogue_client", rogue, "backend-team-a", False, ()),
        ("tfs", ca, "tfserving.internal", True, ("tfserving.internal",)),
        ("gateway_client", ca, "quickdraw-gateway", False, ()),
    ):
        key, cert = issue(parent, cn, server=server, names=names)
        _write_cert(d / f"{name}.pem", cert)
        _write_key(d / f"{name}_key.pem", key)
    return Pki(d)


def sample_cats(n: int) -> np.ndarray:
    path = SAMPLE / "numpy_bitmap" / "cat.npy"
    if not path.exists():
        pytest.skip(f"sample data not found at {SAMPLE}")
    return np.asarray(open_bitmaps(path)[:n]).reshape(n, 28, 28)


def code_of(call: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return call.value.code()  # type: ignore[attr-defined,no-any-return]


def classify_code(target: str, security: ClientSecurity, n: int = 2) -> grpc.StatusCode:
    """The status of one Classify call (OK or the error's code); no retries."""
    with QuickDrawClient(target, security=security, max_attempts=1, timeout_s=10) as c:
        try:
            results = c.classify(list(sample_cats(n)))
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined,no-any-return]
    assert len(results) == n and results[0].top
    return grpc.StatusCode.OK


def tls_overrides(pki: Pki, **more: object) -> dict[str, object]:
    return {"tls_cert_file": pki.server, "tls_key_file": pki.server_key, "warmup": False, **more}


# --- settings ----------------------------------------------------------------------------------------------------


def test_settings_refuse_incomplete_or_unsafe_security(pki: Pki, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("QUICKDRAW_AUTH_TOKEN", raising=False)
    bad = [
        ({"tls_cert_file": pki.server}, "go together"),
        ({"tfserving_tls_key_file": pki.client_key}, "go together"),
        ({"tls_client_ca_file": pki.ca}, "needs TLS"),
        ({"http_tls": True}, "http_tls needs"),
        # mTLS on gRPC with the JSON API on plaintext HTTP would let callers bypass the client certificate
        ({"tls_cert_file": pki.server, "tls_key_file": pki.server_key, "tls_client_ca_file": pki.ca}, "http_tls"),
        ({"tls_cert_file": tmp_path / "nope.pem", "tls_key_file": pki.server_key}, "no such file"),
        ({"auth_token_file": tmp_path / "nope"}, "no such file"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValidationError, match=message):
            Settings(**overrides)  # type: ignore[arg-type]
    Settings(tls_cert_file=pki.server, tls_key_file=pki.server_key, tls_client_ca_file=pki.ca, http_api=False)
    monkeypatch.setenv("QUICKDRAW_AUTH_TOKEN", "   ")
    with pytest.raises(ValidationError, match="set but empty"):
        Settings()
    token_file = tmp_path / "token"
    token_file.write_text("abc\n")
    monkeypatch.setenv("QUICKDRAW_AUTH_TOKEN", "s3cr3t-from-env-0123")
    with pytest.raises(ValidationError, match="not both"):
        Settings(auth_token_file=token_file)
    s = Settings()
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s.model_dump())  # a secret, masked


def test_settings_refuse_short_tokens_and_a_token_on_plaintext_http_beside_tls(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token under MIN_TOKEN_CHARS is refused (the message gives lengths, never the token); so is a token with
    TLS on gRPC while the JSON API listens on plaintext HTTP, unless allow_plaintext_http_token says so."""
    monkeypatch.delenv("QUICKDRAW_AUTH_TOKEN", raising=False)
    short = "x" * (MIN_TOKEN_CHARS - 1)
    monkeypatch.setenv("QUICKDRAW_AUTH_TOKEN", short)
    with pytest.raises(ValidationError, match=f"at least {MIN_TOKEN_CHARS} characters") as info:
        Settings()
    assert short not in str(info.value)
    monkeypatch.delenv("QUICKDRAW_AUTH_TOKEN")
    token_file = tmp_path / "tokens"
    token_file.write_text("a-long-enough-token-0123456789\r\nZ\r\n")  # Windows line endings, a 1-char token
    with pytest.raises(ValidationError, match=r"token 2 is too short.*at least 16 characters \(1 given\)"):
        Settings(auth_token_file=token_file)
    token_file.write_text("a-long-enough-token-0123456789\r\n")
    assert Settings(auth_token_file=token_file).auth_token_file == token_file
    with pytest.raises(ValueError, match="too short"):
        TokenAuth(["short"])
    tls = {"tls_cert_file": pki.server, "tls_key_file": pki.server_key, "auth_token_file": token_file}
    with pytest.raises(ValidationError, match="plaintext HTTP port accepts the same token unencrypted"):
        Settings(**tls)  # type: ignore[arg-type]
    assert Settings(**tls, allow_plaintext_http_token=True).http_api  # type: ignore[arg-type]
    assert Settings(**tls, http_tls=True).http_tls  # type: ignore[arg-type]
    assert not Settings(**tls, http_api=False).http_api  # type: ignore[arg-type]
    assert Settings(tls_cert_file=pki.server, tls_key_file=pki.server_key).http_api  # no token: nothing to leak


def test_the_token_is_never_a_command_line_option() -> None:
    out = subprocess.run([sys.executable, "-m", "quickdraw", "serve", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout  # fmt: skip
    assert "--auth-token-file" in out and "--tls-client-ca-file" in out and "--tfserving-tls-server-name" in out
    assert "--auth-token " not in out and "--auth-token\n" not in out
    assert "QUICKDRAW_AUTH_TOKEN" in out


def test_token_auth_compares_every_token_and_never_echoes_one() -> None:
    old, new = "old-token-0123456789-1", "new-token-0123456789-2"
    auth = TokenAuth([old, new])
    assert auth.matches(old) and auth.matches(new)
    assert not auth.matches("old-token-") and not auth.matches("")
    auth.check(f"Bearer {new}")
    auth.check(f"bearer {old}")
    auth.check(f"Bearer {old}".encode())
    for header, message in ((None, "missing bearer token"), ("Basic abc", "malformed"), ("Bearer", "malformed"),
                            ("Bearer guessed-wrong-secret", "invalid bearer token")):  # fmt: skip
        with pytest.raises(Exception, match=message) as info:
            auth.check(header)
        assert "guessed-wrong-secret" not in str(info.value) and "token-1" not in str(info.value)
    with pytest.raises(ValueError, match="visible ASCII"):
        TokenAuth(["has space"])


@pytest.mark.parametrize("header", ["Bearer \u20ac", "Bearer \u20ac" * 100, "Bearer {t}\r", "Bearer {t}\x00",
                                    "Bearer {t}\n", "Bearer \x00", "Bearer {t}\u00e9", "\udcff", "Bearer \udcff",
                                    b"Bearer \xe2\x82\xac", b"Bearer {t}\r", b"\xff\xfe"])  # fmt: skip
def test_any_undecodable_or_odd_token_is_simply_invalid(header: str | bytes) -> None:
    """Non-ASCII, control characters, lone surrogates, raw bytes: UNAUTHENTICATED (never an encoding error)."""
    token = "the-right-token-0123456789"
    auth = TokenAuth([token])
    value = header.replace(b"{t}", token.encode()) if isinstance(header, bytes) else header.replace("{t}", token)
    with pytest.raises(TokenRefused) as info:
        auth.check(value)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and info.value.reason in ("malformed", "invalid")
    assert token not in info.value.message


def test_log_redaction_covers_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Every record, whatever logger and level: configured tokens, authorization values, Bearer tokens and raw
    header lines are gone from the message and from the traceback; other text stays."""
    token = "configured-" + secrets.token_hex(12)
    install_log_redaction([token])
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("aiohttp.server")
    logger.debug("config says %s", token)
    logger.info("headers %s", {"authorization": "Bearer other-secret-1", "user-agent": "x"})
    logger.warning("bearer token required; got Bearer guessed-secret-2")
    try:
        raise ValueError("400, message:\n  Missing expected LF after header value:\n\n    "
                         "b'Authorization: Bearer raw-secret-3\\r'\n         ^")  # fmt: skip
    except ValueError:
        logger.exception("Error handling request from %s", "127.0.0.1")
    try:
        raise ValueError("Invalid HTTP header: b'Bearer raw-secret-4\\x00'")
    except ValueError:
        logger.error("parse", exc_info=True)
    text = caplog.text
    for secret in (token, "other-secret-1", "guessed-secret-2", "raw-secret-3", "raw-secret-4"):
        assert secret not in text, text
    assert "bearer token required" in text and "Error handling request from 127.0.0.1" in text
    assert "Missing expected LF after header value" in text and "user-agent" not in text.split("authorization")[1]


def test_failed_authentications_are_counted_and_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    """Every failure is counted; the log has one line per interval, with the count since the last one."""
    now = [100.0]
    metrics = Metrics()
    failures = AuthFailureLog(metrics, "grpc", interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="service.security.tokens")
    failures.failed("invalid", "/quickdraw.v1.Classifier/Classify")  # the first one at once
    for i in range(999):
        now[0] += 0.005
        failures.failed("missing" if i % 3 else "invalid")
    assert len(caplog.records) == 1 and "1 failed grpc authentication(s)" in caplog.text
    now[0] = 111.0
    failures.failed("malformed")
    assert len(caplog.records) == 2
    assert "1000 failed grpc authentication(s)" in caplog.records[1].getMessage()
    assert "invalid 333" in caplog.records[1].getMessage() and "malformed 1" in caplog.records[1].getMessage()
    failures.flush()  # nothing new: no line
    assert len(caplog.records) == 2
    value = {(s.labels["transport"], s.labels["reason"]): s.value
             for m in metrics.auth_failures.collect() for s in m.samples if s.name.endswith("_total")}  # fmt: skip
    assert value == {("grpc", "invalid"): 334, ("grpc", "missing"): 666, ("grpc", "malformed"): 1}


# --- TLS on the gateway's gRPC port -------------------------------------------------------------------------------


def test_tls_port_serves_tls_and_refuses_plaintext_and_untrusted_clients(pki: Pki) -> None:
    with RunningGateway(**tls_overrides(pki)) as gw:
        assert classify_code(gw.target, ClientSecurity(ca_file=pki.ca)) == grpc.StatusCode.OK
        assert classify_code(gw.target, ClientSecurity(ca_file=pki.ca, server_name="localhost")) == grpc.StatusCode.OK
        # a plaintext client gets no answer from a TLS port
        assert classify_code(gw.target, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE
        # a client that does not trust the gateway's CA refuses it
        assert classify_code(gw.target, ClientSecurity(ca_file=pki.rogue_ca)) == grpc.StatusCode.UNAVAILABLE
        # the name checked must be in the certificate
        assert classify_code(gw.target, ClientSecurity(ca_file=pki.ca, server_name="evil.example")) == \
            grpc.StatusCode.UNAVAILABLE  # fmt: skip
        # without --http-tls the HTTP port stays plaintext (metrics for Prometheus)
        assert gw.scrape()["quickdraw_ready"] == 1


# --- mTLS and a token file, on both ports -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens() -> tuple[str, str]:
    return "tok-" + secrets.token_urlsafe(24), "rot-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def mtls(pki: Pki, tokens: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """mTLS on gRPC and HTTP, two tokens from a file (rotation), reflection not exempt."""
    token_file = tmp_path_factory.mktemp("secrets") / "tokens"
    token_file.write_text(f"{tokens[0]}\n\n  {tokens[1]}  \n")
    with RunningGateway(**tls_overrides(pki, tls_client_ca_file=pki.ca, http_tls=True, auth_token_file=token_file,
                                        auth_exempt_reflection=False)) as gw:  # fmt: skip
        yield gw


def client_security(pki: Pki, token: str | None = None, **kw: object) -> ClientSecurity:
    files = {"ca_file": pki.ca, "cert_file": pki.client, "key_file": pki.client_key}
    return ClientSecurity(**{**files, "token": token, **kw})  # type: ignore[arg-type]


def test_mtls_requires_a_client_certificate_from_the_right_ca(mtls: RunningGateway, pki: Pki,
                                                              tokens: tuple[str, str]) -> None:  # fmt: skip
    token = tokens[0]
    assert classify_code(mtls.target, client_security(pki, token)) == grpc.StatusCode.OK
    no_cert = ClientSecurity(ca_file=pki.ca, token=token)
    assert classify_code(mtls.target, no_cert) == grpc.StatusCode.UNAVAILABLE
    wrong_ca = client_security(pki, token, cert_file=pki.rogue_client, key_file=pki.rogue_client_key)
    assert classify_code(mtls.target, wrong_ca) == grpc.StatusCode.UNAVAILABLE
    assert classify_code(mtls.target, ClientSecurity(token=token)) == grpc.StatusCode.UNAVAILABLE  # plaintext


def test_bearer_token_on_every_grpc_api_but_health(mtls: RunningGateway, pki: Pki, tokens: tuple[str, str]) -> None:
    old, new = tokens
    assert classify_code(mtls.target, client_security(pki, new)) == grpc.StatusCode.OK  # both tokens work
    wrong = "guess-" + secrets.token_urlsafe(16)
    with client_security(pki).channel(mtls.target) as ch:
        stub_call = ch.unary_unary("/quickdraw.v1.Classifier/GetModelInfo",
                                   request_serializer=pb.GetModelInfoRequest.SerializeToString,
                                   response_deserializer=pb.ModelInfo.FromString)  # fmt: skip
        for metadata, message in ((None, "missing bearer token"), ((("authorization", f"Bearer {wrong}"),),
                                   "invalid bearer token"), ((("authorization", old),), "malformed")):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                stub_call(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)
            assert code_of(info) == grpc.StatusCode.UNAUTHENTICATED
            assert message in info.value.details()  # type: ignore[attr-defined]
            assert wrong not in info.value.details() and old not in info.value.details()  # type: ignore[attr-defined]
        assert stub_call(pb.GetModelInfoRequest(), timeout=10,
                         metadata=(("authorization", f"Bearer {old}"),)).name == "quickdraw"  # fmt: skip

        # a stream is refused as a whole
        stream = ch.stream_stream("/quickdraw.v1.Classifier/ClassifyStream",
                                  request_serializer=pb.ClassifyStreamRequest.SerializeToString,
                                  response_deserializer=pb.ClassifyStreamResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            list(stream(iter([pb.ClassifyStreamRequest(id="1")]), timeout=10))
        assert code_of(info) == grpc.StatusCode.UNAUTHENTICATED

        # TF Serving's API on the gateway too
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "quickdraw"
        req.inputs["image"].ParseFromString(from_numpy(sample_cats(1).reshape(1, 28, 28, 1)).SerializeToString())
        predict = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict
        with pytest.raises(grpc.RpcError) as info:
            predict(req, timeout=10)
        assert code_of(info) == grpc.StatusCode.UNAUTHENTICATED
        assert predict(req, timeout=10, metadata=(("authorization", f"Bearer {new}"),)).outputs["probabilities"]

        # an unknown method: UNAUTHENTICATED without a token (no hint of what exists), UNIMPLEMENTED with one
        nope = ch.unary_unary("/quickdraw.v1.Classifier/Nope")
        with pytest.raises(grpc.RpcError) as info:
            nope(b"", timeout=10)
        assert code_of(info) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            nope(b"", timeout=10, metadata=(("authorization", f"Bearer {new}"),))
        assert code_of(info) == grpc.StatusCode.UNIMPLEMENTED

        # health is exempt: Kubernetes probes and load balancers carry no token
        health = health_pb2_grpc.HealthStub(ch)
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving

        # reflection is not exempt here (auth_exempt_reflection=False)
        reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        with pytest.raises(grpc.RpcError) as info:
            list(reflect.ServerReflectionInfo(iter(ask), timeout=10))
        assert code_of(info) == grpc.StatusCode.UNAUTHENTICATED
        with_token = (("authorization", f"Bearer {new}"),)
        [resp] = list(reflect.ServerReflectionInfo(iter(ask), timeout=10, metadata=with_token))
        assert "quickdraw.v1.Classifier" in {s.name for s in resp.list_services_response.service}


def https(url: str, pki: Pki, *, cert: bool, token: str | None = None, body: object = None) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(str(pki.client), str(pki.client_key))
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if resp.headers.get_content_type() == "application/json" else {})
    except urllib.error.HTTPError as err:
        assert err.headers.get("WWW-Authenticate") == "Bearer" or err.code != 401
        return err.code, json.loads(err.read())


def test_http_port_with_tls_honours_the_token_and_the_client_certificate(mtls: RunningGateway, pki: Pki,
                                                                         tokens: tuple[str, str]) -> None:  # fmt: skip
    base = f"https://127.0.0.1:{mtls.app.http_port}"
    body = {"drawings": [{"bitmap": {"pixels": base64.b64encode(sample_cats(1).tobytes()).decode()}}]}
    status, answer = https(f"{base}/v1/classify", pki, cert=True, token=tokens[1], body=body)
    assert status == 200 and answer["predictions"][0]["top"]
    status, answer = https(f"{base}/v1/classify", pki, cert=True, body=body)
    assert status == 401 and answer["error"]["status"] == "UNAUTHENTICATED"
    status, answer = https(f"{base}/v1/model", pki, cert=True, token="wrong-" + tokens[0])
    assert status == 401 and tokens[0] not in json.dumps(answer)
    status, answer = https(f"{base}/v1/model", pki, cert=False, token=tokens[0])  # no client certificate
    assert status == 401 and "client certificate" in answer["error"]["message"]
    status, _ = https(f"{base}/metrics", pki, cert=False)  # Prometheus: no certificate, no token
    assert status == 200
    with pytest.raises(OSError):  # the HTTP port speaks only TLS (the server hangs up on plaintext)
        urllib.request.urlopen(f"http://127.0.0.1:{mtls.app.http_port}/metrics", timeout=10)


def test_quickdraw_classify_with_tls_and_a_token(mtls: RunningGateway, pki: Pki, tokens: tuple[str, str],
                                                 tmp_path: Path) -> None:  # fmt: skip
    if not (SAMPLE / "simplified" / "cat.ndjson").exists():
        pytest.skip(f"sample data not found at {SAMPLE}")
    token_file = tmp_path / "token"
    token_file.write_text(tokens[0] + "\n")
    tls = ["--tls-ca-file", str(pki.ca), "--tls-cert-file", str(pki.client), "--tls-key-file", str(pki.client_key)]
    base = [sys.executable, "-m", "quickdraw", "classify", "--target", mtls.target, "--limit", "3",
            str(SAMPLE / "simplified" / "cat.ndjson"), *tls]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "QUICKDRAW_AUTH_TOKEN"}
    ok = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 3 and "cat" in ok.stdout
    by_env = subprocess.run(base, capture_output=True, text=True, env={**env, "QUICKDRAW_AUTH_TOKEN": tokens[1]},
                            cwd=ROOT)  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    refused = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT)
    assert refused.returncode == 1 and "UNAUTHENTICATED: missing bearer token" in refused.stderr


def test_loadtest_engine_with_tls_and_a_token(mtls: RunningGateway, pki: Pki, tokens: tuple[str, str]) -> None:
    from loadtest.engine import LoadConfig, run_load
    from loadtest.sources import load_pool

    pool = load_pool([SAMPLE / "numpy_bitmap" / "cat.npy"], ["bitmap"], size=16)
    for stream in (False, True):
        for token in (tokens[0], None):
            cfg = LoadConfig(target=mtls.target, concurrency=2, duration_s=None, count=10, warmup_s=0.0,
                             stream=stream, security=client_security(pki, token))  # fmt: skip
            stats = asyncio.run(run_load(cfg, pool))
            if token is not None:
                assert stats.codes == {"OK": stats.calls}, (stream, stats.codes)
            elif not stream:
                assert stats.codes == {"UNAUTHENTICATED": stats.calls}, stats.codes
            else:
                # The stream is refused as a whole. grpc's aio client reports a write that races the server's
                # UNAUTHENTICATED trailers as INTERNAL ("Internal error from Core"), so either code may be seen.
                assert stats.calls and set(stats.codes) <= {"UNAUTHENTICATED", "INTERNAL"}, stats.codes


# --- a token from the environment, plaintext, reflection exempt -------------------------------------------------------


def test_token_from_the_environment_with_reflection_exempt(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "env-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("QUICKDRAW_AUTH_TOKEN", token)
    with RunningGateway(warmup=False, auth_exempt_reflection=True) as gw:
        assert "**" in repr(gw.settings.auth_token)
        assert classify_code(gw.target, ClientSecurity()) == grpc.StatusCode.UNAUTHENTICATED
        assert classify_code(gw.target, ClientSecurity(token=token)) == grpc.StatusCode.OK
        with grpc.insecure_channel(gw.target) as ch:  # reflection answers without a token here
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch)
            [resp] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                       timeout=10))  # fmt: skip
            assert "quickdraw.v1.Classifier" in {s.name for s in resp.list_services_response.service}
        # the plaintext JSON API needs it too; /metrics does not
        url = f"http://127.0.0.1:{gw.app.http_port}/v1/model"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)
        assert info.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["name"] == "quickdraw"
        assert gw.scrape()["quickdraw_ready"] == 1


# --- nothing secret in the logs ------------------------------------------------------------------------------------


def test_logs_hold_neither_drawings_nor_tokens(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                               capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The real server at DEBUG, sent every drawing kind, bad drawings and a wrong token: none of it is logged."""
    token, wrong = "tok-" + secrets.token_urlsafe(24), "bad-" + secrets.token_urlsafe(24)
    marker = "PIXELS-" + secrets.token_hex(6)
    pixels = np.zeros(784, np.uint8)
    pixels[100 : 100 + len(marker)] = np.frombuffer(marker.encode(), np.uint8)
    png_marker = "PNGTEXT-" + secrets.token_hex(6)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", png_marker)
    buf = io.BytesIO()
    Image.fromarray(sample_cats(1)[0]).resize((112, 112)).save(buf, format="PNG", pnginfo=info)
    png = buf.getvalue()
    xs, ys = [731517.25, 731901.5, 732333.75], [-412871.5, -412001.25, -411555.0]  # raw screen coordinates
    too_far = 1999999.75  # beyond max_raw_coordinate: an error whose message names it, to the caller only
    secrets_and_payloads = [token, wrong, marker, png_marker, base64.b64encode(pixels.tobytes()).decode()[:40],
                            base64.b64encode(png).decode()[:40], "731517", "412871", "1999999", "PNGTEXT"]  # fmt: skip

    monkeypatch.setenv("QUICKDRAW_AUTH_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    for name in ("service", "grpc", "aiohttp", "asyncio"):
        caplog.set_level(logging.DEBUG, logger=name)
    with RunningGateway(warmup=False) as gw:
        good = ClientSecurity(token=token)
        with QuickDrawClient(gw.target, security=good, max_attempts=1) as c:
            results = c.classify([pixels.reshape(28, 28), png, [[xs, ys]]], raw=True)
            assert len(results) == 3
            with pytest.raises(grpc.RpcError) as err:
                c.classify([[[[too_far, 0.0], [0.0, 1.0]]]], raw=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError):
                c.classify([b"\x89PNG\r\n\x1a\n" + png_marker.encode() * 4])  # undecodable image, marker inside
            answers = list(c.stream([("1", c.request([pixels.reshape(28, 28)])),
                                     ("2", c.request([[[[too_far], [1.0]]]], raw=True))]))  # fmt: skip
            assert len(answers) == 2
        with QuickDrawClient(gw.target, security=ClientSecurity(token=wrong), max_attempts=1) as c, \
                pytest.raises(grpc.RpcError) as err:  # fmt: skip
            c.classify([pixels.reshape(28, 28)])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        body = json.dumps({"drawings": [{"strokes": {"coordinates": "RAW", "strokes": [{"x": xs, "y": ys}]}},
                                        {"image": {"data": base64.b64encode(png).decode()}}]}).encode()  # fmt: skip
        for auth in (token, wrong):
            req = urllib.request.Request(f"http://127.0.0.1:{gw.app.http_port}/v1/classify", data=body,
                                         headers={"Authorization": f"Bearer {auth}",
                                                  "Content-Type": "application/json"})  # fmt: skip
            try:
                urllib.request.urlopen(req, timeout=10).read()
            except urllib.error.HTTPError as exc:
                assert exc.code == 401 and auth == wrong
    out, errout = capfd.readouterr()
    logs = caplog.text
    assert "serving quickdraw versions" in logs and "bearer token required" in logs, "the logs were not captured"
    for needle in secrets_and_payloads:
        assert needle not in logs, f"{needle!r} appears in the logs"
        assert needle not in out and needle not in errout, f"{needle!r} appears on stdout/stderr"


# --- TLS and mTLS on the channel to TF Serving --------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(pki: Pki) -> Iterator[object]:
    from tfserving_standin import TFServingStandIn

    with TFServingStandIn(SHIPPED_MODEL) as s:
        yield s


def serve_tls(standin: object, pki: Pki, *, client_certs: bool) -> None:
    """Restart the stand-in on its port with TLS (mTLS when ``client_certs``), as --ssl_config_file does."""
    pair = (pki.tfs_key.read_bytes(), pki.tfs.read_bytes())
    standin.credentials = grpc.ssl_server_credentials(  # type: ignore[attr-defined]
        [pair], root_certificates=pki.ca.read_bytes() if client_certs else None, require_client_auth=client_certs
    )
    standin.restart()  # type: ignore[attr-defined]


def tfs_gateway(standin: object, **overrides: object) -> RunningGateway:
    return RunningGateway(backend="tfserving", tfserving_target=standin.target,  # type: ignore[attr-defined]
                          tfserving_startup_timeout_s=3.0, **overrides)  # fmt: skip


def assert_cannot_start(gw: RunningGateway) -> str:
    try:
        with pytest.raises(RuntimeError, match="did not report") as info:
            gw.__enter__()
    finally:
        gw.stop()
    return str(info.value)


def test_tfserving_channel_with_tls(standin: object, pki: Pki) -> None:
    serve_tls(standin, pki, client_certs=False)
    before = len(standin.seen)  # type: ignore[attr-defined]
    with tfs_gateway(standin, tfserving_tls_ca_file=pki.ca, tfserving_tls_server_name="tfserving.internal") as gw:
        assert classify_code(gw.target, ClientSecurity()) == grpc.StatusCode.OK
    assert len(standin.seen) > before  # type: ignore[attr-defined]
    # the stand-in's certificate names tfserving.internal, not 127.0.0.1: without the override it is refused
    assert "Hostname Verification" in assert_cannot_start(tfs_gateway(standin, tfserving_tls_ca_file=pki.ca))
    assert "UNAVAILABLE" in assert_cannot_start(tfs_gateway(standin))  # plaintext to a TLS TF Serving


def test_tfserving_channel_with_mtls(standin: object, pki: Pki) -> None:
    serve_tls(standin, pki, client_certs=True)
    files = {"tfserving_tls_ca_file": pki.ca, "tfserving_tls_server_name": "tfserving.internal"}
    with tfs_gateway(standin, **files, tfserving_tls_cert_file=pki.gateway_client,
                     tfserving_tls_key_file=pki.gateway_client_key) as gw:  # fmt: skip
        assert classify_code(gw.target, ClientSecurity(), n=5) == grpc.StatusCode.OK
    assert "UNAVAILABLE" in assert_cannot_start(tfs_gateway(standin, **files))  # no client certificate
    rogue = {"tfserving_tls_cert_file": pki.rogue_client, "tfserving_tls_key_file": pki.rogue_client_key}
    assert "UNAVAILABLE" in assert_cannot_start(tfs_gateway(standin, **files, **rogue))  # from the wrong CA
