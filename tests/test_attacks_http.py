"""Attacks on the HTTP port of a real gateway process, each measured with ``attack_probe``.

Two gateways: ``plain`` (the defaults: no token, so the Host/Origin allow-list applies; started under a soft
limit of 1,024 file descriptors, as in the report) and ``guarded`` (a bearer token, request compression on,
1 s header and body timeouts). Every attack must leave grpc health answering within 100 ms, RSS growth under
100 MiB and the gateway's CPU under 0.5 s per refused request; the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import resource
import socket
import time
from collections.abc import Iterator

import pytest
from attack_probe import TOKEN, AttackedGateway, measured, open_fds
from harness import SHIPPED_MODEL

#: The shipped limits (service/settings.py): 256 drawings of 256 strokes.
MAX_DRAWINGS = MAX_STROKES = 256
#: The body limit: 4 x max_message_bytes (4 MiB).
MAX_BODY = 16 * 1024 * 1024
CANCELLED = 'quickdraw_request_errors_total{code="CANCELLED",fault="client",method="http:Classify"}'
INTERNAL = 'quickdraw_request_errors_total{code="INTERNAL",fault="server",method="http:Classify"}'
GUARD_TIMEOUT_S = 1.0


def bomb(drawings: int = 512, strokes: int = 512, stroke: str = '{"x":[],"y":[]}') -> bytes:
    """A ClassifyRequest of ``drawings`` x ``strokes`` empty strokes: tiny gzipped, seconds to parse."""
    drawing = '{"strokes":{"strokes":[' + ",".join([stroke] * strokes) + "]}}"
    return ('{"drawings":[' + ",".join([drawing] * drawings) + "]}").encode()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], dict]:  # fmt: skip
    """One HTTP request; the status, headers and JSON body (empty if not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {}
        return resp.status, dict(resp.getheaders()), answer
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, trickle: bytes = b"", every_s: float = 0.2,
                 timeout: float = 10) -> tuple[bytes, float, float]:  # fmt: skip
    """Send ``data`` (then ``trickle`` every ``every_s``), read until the server closes; returns what came back,
    when the first byte came and when the connection closed (seconds after sending)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(every_s if trickle else timeout)
        sock.sendall(data)
        t0, first, out = time.monotonic(), None, b""
        while time.monotonic() - t0 < timeout:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if trickle and first is None:
                    with contextlib.suppress(OSError):
                        sock.sendall(trickle)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            if first is None:
                first = time.monotonic() - t0
            out += chunk
        return out, first if first is not None else float("inf"), time.monotonic() - t0


def status_of(raw: bytes) -> int:
    """The status code of a raw HTTP response."""
    return int(raw.split(b" ", 2)[1]) if raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


def fd_limit(pid: int) -> str:
    """The 'Max open files' line of /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as fh:
        return next(" ".join(line.split()) for line in fh if line.startswith("Max open files"))


@pytest.fixture(scope="module")
def plain() -> Iterator[AttackedGateway]:
    """The defaults, no token; started with a soft limit of 1,024 descriptors (the gateway raises its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    try:
        gw = AttackedGateway("--model-dir", str(SHIPPED_MODEL))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield gw
    gw.kill()


@pytest.fixture(scope="module")
def guarded() -> Iterator[AttackedGateway]:
    """A bearer token, request compression on, 1 s header and body timeouts."""
    gw = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--http-request-compression",
                         "--http-header-timeout-s", str(GUARD_TIMEOUT_S), "--http-body-timeout-s",
                         str(GUARD_TIMEOUT_S), env={"QUICKDRAW_AUTH_TOKEN": TOKEN})  # fmt: skip
    yield gw
    gw.kill()


JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# --- bodies ---------------------------------------------------------------------------------------------------


def test_gzip_json_bomb_is_refused_before_it_is_read(plain: AttackedGateway) -> None:
    body = gzip.compress(bomb(), 9)
    assert len(body) < 12_000
    answers = []
    with measured(plain, f"gzip JSON bomb ({len(body)} bytes, compression off)", requests=5) as cost:
        for _ in range(5):  # the body is compressed once, before the clock starts: no client work is timed
            t0 = time.monotonic()
            status, _, answer = request(plain.http_port, "POST", "/v1/classify", body,
                                        {**JSON, "Content-Encoding": "gzip"})  # fmt: skip
            answers.append((status, answer, time.monotonic() - t0))
    for status, answer, took in answers:  # every one, not the last
        assert took < 0.5, f"refused in {took * 1000:.0f} ms"
        assert status == 415 and answer["error"]["status"] == "INVALID_ARGUMENT", (status, answer)
        assert "http_request_compression" in answer["error"]["message"], answer
    cost.assert_bounds()


def test_a_compressed_body_gets_the_same_answer_at_every_http_door(plain: AttackedGateway) -> None:
    """One Content-Encoding rule for every HTTP door: with request compression off, a gzip body is a 415 naming
    the setting on /v1 and on /v2 alike (/v2 once answered 400)."""
    body = gzip.compress(b'{"inputs": []}')
    answers = {path: request(plain.http_port, "POST", path, body, {**JSON, "Content-Encoding": "gzip"})
               for path, _ in BODY_DOORS}  # fmt: skip
    for path, (status, _, answer) in answers.items():
        # each door answers in its own error shape: /v1 google.rpc.Status as JSON, /v2 the OIP's {"error": text}
        message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
        assert status == 415, (path, status, answer)
        assert "http_request_compression" in message, (path, answer)


def test_gzip_json_bomb_with_compression_on_is_refused_by_the_count(guarded: AttackedGateway) -> None:
    body = gzip.compress(bomb(), 9)
    answers = []
    with measured(guarded, f"gzip JSON bomb ({len(body)} bytes, compression on)", requests=3) as cost:
        for _ in range(3):
            status, _, answer = request(guarded.http_port, "POST", "/v1/classify", body,
                                        {**JSON, **AUTH, "Content-Encoding": "gzip"})  # fmt: skip
            answers.append((status, answer))
    for status, answer in answers:
        assert status == 400 and "max_strokes=256" in answer["error"]["message"], answer
    cost.assert_bounds()


def test_gzip_bomb_over_the_body_limit_once_decompressed_is_413(guarded: AttackedGateway) -> None:
    body = gzip.compress(b'{"drawings": [' + b" " * (MAX_BODY + 1024) + b"]}", 9)
    with measured(guarded, f"gzip of {MAX_BODY // 2**20 + 1} MiB of spaces ({len(body)} bytes)") as cost:
        status, _, answer = request(guarded.http_port, "POST", "/v1/classify", body,
                                    {**JSON, **AUTH, "Content-Encoding": "gzip"})  # fmt: skip
    assert status == 413 and answer["error"]["status"] == "RESOURCE_EXHAUSTED", answer
    cost.assert_bounds()


def test_uncompressed_16_mb_bomb_is_refused_by_the_count(plain: AttackedGateway) -> None:
    stroke = '{"x": [], "y": [], "tMs": []}'.ljust(60)
    body = bomb(stroke=stroke)
    assert 15_000_000 < len(body) <= MAX_BODY
    with measured(plain, f"uncompressed JSON bomb ({len(body) / 1e6:.1f} MB)") as cost:
        status, _, answer = request(plain.http_port, "POST", "/v1/classify", body, JSON)
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT"
    assert "max_drawings_per_request=256" in answer["error"]["message"], answer
    cost.assert_bounds()


def test_text_plain_and_form_posts_are_refused(plain: AttackedGateway) -> None:
    body = json.dumps({"drawings": []}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, _, answer = request(plain.http_port, "POST", "/v1/classify", body, {"Content-Type": kind})
        assert status == 415, (kind, answer)
        assert kind.split(";")[0] in answer["error"]["message"] and "application/json" in answer["error"]["message"]
    status, _, answer = request(plain.http_port, "POST", "/v1/classify", body)  # no Content-Type at all
    assert status == 415 and "none" in answer["error"]["message"]


# --- connections ----------------------------------------------------------------------------------------------


def test_idle_connections_do_not_lock_out_a_new_client(plain: AttackedGateway) -> None:
    print(f"\n[attack] gateway {fd_limit(plain.pid)}; test process {resource.getrlimit(resource.RLIMIT_NOFILE)}")
    before = plain.scrape()
    socks: list[socket.socket] = []
    try:
        with measured(plain, "1,100 idle connections, then one client", requests=1100) as cost:
            for _ in range(1100):
                socks.append(socket.create_connection(("127.0.0.1", plain.http_port), timeout=5))
            time.sleep(0.2)
            fds = open_fds(plain.pid)
            t0 = time.monotonic()
            status, _, answer = request(plain.http_port, "GET", "/v1/model", timeout=5)
            waited = time.monotonic() - t0
        assert status == 200 and answer.get("labels"), answer
        assert waited < 1.0, f"a new client waited {waited:.2f} s"
        key = 'quickdraw_http_connections_closed_total{reason="evicted"}'
        end = time.monotonic() + 5
        while True:  # the listen backlog (128) lets connections in after the client: wait until all are accepted
            after = plain.scrape()
            evicted = after.get(key, 0) - before.get(key, 0)
            if evicted >= 100 or time.monotonic() > end:  # those the backlog overflowed come in SYN-ACK retries
                break
            time.sleep(0.2)
    finally:
        for s in socks:
            s.close()
    print(f"[attack] gateway held {fds} descriptors with 1,100 idle connections open; {evicted:.0f} idle "
          f"connections closed to make room; {after['quickdraw_http_connections']:.0f} open; the new client waited "
          f"{waited * 1000:.0f} ms")
    assert evicted >= 1
    assert after["quickdraw_http_connections"] <= 1000
    cost.assert_bounds()


def test_idle_and_slow_header_connections_are_closed_after_the_header_timeout(guarded: AttackedGateway) -> None:
    socks = [socket.create_connection(("127.0.0.1", guarded.http_port)) for _ in range(50)]
    slow = socket.create_connection(("127.0.0.1", guarded.http_port))
    with measured(guarded, "50 idle connections and 1 slowloris, header timeout 1 s", requests=51) as cost:
        t0 = time.monotonic()
        slow.sendall(b"GET /v1/model HTTP/1.1\r\nHost: localhost\r\n")
        closed_at = []
        for s in [slow, *socks]:
            s.settimeout(0.2)
            while True:
                try:
                    if s.recv(1024) == b"":
                        break
                except TimeoutError:
                    if s is slow:
                        try:
                            s.sendall(b"X-Slow: 1\r\n")  # one header line every 200 ms, never the blank line
                        except OSError:
                            break
                    assert time.monotonic() - t0 < GUARD_TIMEOUT_S + 3, "still open"
                except ConnectionResetError:
                    break
            closed_at.append(time.monotonic() - t0)
    for s in [slow, *socks]:
        s.close()
    print(f"[attack] idle connections closed within {max(closed_at):.2f} s (header timeout {GUARD_TIMEOUT_S} s)")
    assert max(closed_at) < GUARD_TIMEOUT_S + 1.5
    cost.assert_bounds()


#: The HTTP doors that take a body, and the method their calls are counted under: every one goes through the
#: HTTP server's one set of body guards (HttpServer.read_body).
BODY_DOORS = [("/v1/classify", "http:Classify"), ("/v2/models/quickdraw/infer", "http:ModelInfer")]


def _headers(extra: str, path: str = "/v1/classify") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\n{extra}\r\n").encode()  # fmt: skip


@pytest.mark.parametrize(("path", "method"), BODY_DOORS, ids=["v1", "v2"])
def test_never_ending_chunked_body_gets_408_within_the_body_timeout(guarded: AttackedGateway, path: str,
                                                                    method: str) -> None:  # fmt: skip
    with measured(guarded, f"chunked body that never ends on {path}, body timeout 1 s") as cost:
        out, first, closed = raw_exchange(guarded.http_port, _headers("Transfer-Encoding: chunked\r\n", path)
                                          + b"2\r\n{\"\r\n", trickle=b"1\r\n \r\n")  # fmt: skip
    print(f"[attack] never-ending chunked body: {status_of(out)} after {first:.2f} s, closed after {closed:.2f} s")
    assert status_of(out) == 408 and b"http_body_timeout_s" in out
    assert first < GUARD_TIMEOUT_S + 0.5 and closed < GUARD_TIMEOUT_S + 2.5
    cost.assert_bounds()


@pytest.mark.parametrize(("path", "method"), BODY_DOORS, ids=["v1", "v2"])
def test_content_length_larger_than_the_body_gets_408_within_the_body_timeout(guarded: AttackedGateway, path: str,
                                                                              method: str) -> None:  # fmt: skip
    with measured(guarded, f"Content-Length 1000, 10 bytes sent on {path}, body timeout 1 s") as cost:
        out, first, closed = raw_exchange(guarded.http_port, _headers("Content-Length: 1000\r\n", path)
                                          + b'{"drawings"')  # fmt: skip
    print(f"[attack] short body: {status_of(out)} after {first:.2f} s, closed after {closed:.2f} s")
    assert status_of(out) == 408
    assert first < GUARD_TIMEOUT_S + 0.5 and closed < GUARD_TIMEOUT_S + 2.5
    cost.assert_bounds()


@pytest.mark.parametrize(("path", "method"), BODY_DOORS, ids=["v1", "v2"])
def test_a_client_leaving_mid_body_is_cancelled_not_internal(plain: AttackedGateway, path: str, method: str) -> None:
    """Finding 7: clients that leave mid-body are CANCELLED (a client fault), never INTERNAL (which pages), at
    every HTTP door that takes a body (/v2 once answered INTERNAL, fault="server", with a traceback each)."""
    leavers = 10
    cancelled = CANCELLED.replace("http:Classify", method)
    internal = INTERNAL.replace("http:Classify", method)
    before = plain.scrape()
    with measured(plain, f"{leavers} clients leaving mid-body on {path}", leavers) as cost:
        for _ in range(leavers):
            with socket.create_connection(("127.0.0.1", plain.http_port)) as sock:
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                             "Content-Length: 100000\r\n\r\n".encode() + b'{"inputs": [' + b" " * 1000)  # fmt: skip
                time.sleep(0.05)
        time.sleep(0.3)
    after = plain.scrape()
    assert after.get(cancelled, 0) - before.get(cancelled, 0) == leavers, {k: v for k, v in after.items()
                                                                           if "errors" in k}  # fmt: skip
    assert after.get(internal, 0) == before.get(internal, 0)
    assert plain.output().count("Traceback") == 0, plain.output()[-2000:]
    cost.assert_bounds()


# --- credentials and browsers ---------------------------------------------------------------------------------


def test_a_non_ascii_token_is_401_not_500(guarded: AttackedGateway) -> None:
    """Finding 7: ``Bearer €`` is a 401 counted as a failed authentication, never a 500 (which pages)."""
    before = guarded.scrape()
    request_bytes = ("GET /v1/model HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer €\r\n"
                     "Connection: close\r\n\r\n").encode()  # fmt: skip
    with measured(guarded, "Bearer € on the JSON API") as cost:
        out, _, _ = raw_exchange(guarded.http_port, request_bytes)
    cost.assert_bounds()
    after = guarded.scrape()
    assert status_of(out) == 401, out[:300]
    assert b"Traceback" not in out and b"INTERNAL" not in out
    assert not any(k.startswith("quickdraw_request_errors_total") and "INTERNAL" in k and v > before.get(k, 0)
                   for k, v in after.items())  # fmt: skip
    failures = sum(v - before.get(k, 0) for k, v in after.items()
                   if k.startswith("quickdraw_auth_failures_total") and 'transport="http"' in k)  # fmt: skip
    assert failures == 1


def test_foreign_host_and_origin_are_refused_without_a_token(plain: AttackedGateway) -> None:
    port = plain.http_port
    status, _, answer = request(port, "GET", "/v1/model", headers={"Host": "rebound.example:8080"})
    assert status == 421 and "http_allowed_hosts" in answer["error"]["message"], answer
    status, _, answer = request(port, "POST", "/v1/classify", b'{"drawings": []}',
                                {**JSON, "Host": "localhost:8080", "Origin": "https://evil.example"})  # fmt: skip
    assert status == 403 and "evil.example" in answer["error"]["message"], answer
    status, _, _ = request(port, "GET", "/", headers={"Host": "rebound.example"})
    assert status == 421
    for host in ("localhost:1234", "127.0.0.1", "[::1]:8080"):
        status, _, _ = request(port, "GET", "/v1/model", headers={"Host": host, "Origin": f"http://{host}"})
        assert status == 200, host
    status, _, _ = request(port, "GET", "/metrics", headers={"Host": "10.1.2.3:8080"})  # Prometheus, by pod IP
    assert status == 200


def test_foreign_host_and_origin_are_accepted_with_a_token(guarded: AttackedGateway) -> None:
    headers = {"Host": "gateway.example", "Origin": "https://tool.example"}
    status, _, _ = request(guarded.http_port, "GET", "/v1/model", headers={**headers, **AUTH})
    assert status == 200
    status, _, _ = request(guarded.http_port, "GET", "/v1/model", headers=headers)
    assert status == 401


def test_the_server_header_names_no_software(plain: AttackedGateway) -> None:
    for path, method, body in (("/v1/model", "GET", None), ("/metrics", "GET", None), ("/", "GET", None),
                               ("/v1/classify", "POST", b"x"), ("/nowhere", "GET", None)):  # fmt: skip
        _, headers, _ = request(plain.http_port, method, path, body)
        assert headers.get("Server") == "quickdraw", (path, headers.get("Server"))
    out, _, _ = raw_exchange(plain.http_port, b"NOT HTTP AT ALL\r\n\r\n")  # aiohttp's own 400
    assert status_of(out) == 400 and b"aiohttp" not in out.lower() and b"python" not in out.lower(), out[:300]
