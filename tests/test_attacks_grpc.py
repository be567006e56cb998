"""Attacks on the gRPC port of a real gateway process, each with its measured cost (security issue findings 1, 3,
8, 9 and 10; tests/test_attacks_http.py, _auth.py and _images.py cover the rest).

Each test sends the attack a security review confirmed, then asserts with ``attack_probe.measured`` that grpc
health answered within 100 ms throughout, RSS grew by less than 100 MiB, and the gateway spent at most 0.5 s
of CPU per refused request; the figures are printed (``pytest -s -k attacks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import zlib

import grpc
import pytest
from attack_probe import TOKEN, AttackedGateway, measured, open_fds
from faults import bitmaps
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import SHIPPED_MODEL
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions
from service.core.errors import MAX_MESSAGE_CHARS, MAX_STATUS_BYTES, MAX_VIOLATIONS
from service.protos import oip

pytestmark = [
    pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}"),
    pytest.mark.slow,
]

#: Finding 1: 2,097,144 empty drawings, 4 MiB of protobuf that gzip makes ~4 KB.
BOMB = b"\x0a\x00" * 2_097_144
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REFUSAL_BOUND_S = 0.050


def _identity(b: bytes) -> bytes:
    return b


@pytest.fixture(scope="module")
def gw() -> AttackedGateway:
    """An open gateway (no token, as the shipped manifests run it), started as containers often start it: with a
    soft file-descriptor limit of 1,024 (Docker 25's default) under a higher hard limit."""
    g = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--grpc-handshake-timeout-s", "4",
                        "--max-open-streams", "300", nofile=(1024, 20000))  # fmt: skip
    _warm(g.target)
    yield g
    g.kill()


@pytest.fixture(scope="module")
def token_gw() -> AttackedGateway:
    """A gateway that requires a bearer token."""
    g = AttackedGateway("--model-dir", str(SHIPPED_MODEL), env={"QUICKDRAW_AUTH_TOKEN": TOKEN})
    _warm(g.target, AUTH)
    yield g
    g.kill()


def _warm(target: str, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for pixels in bitmaps(8):
            stub.Classify(pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=pixels))]), timeout=30,
                          metadata=metadata)  # fmt: skip


def _raw_classify(ch: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return ch.unary_unary("/quickdraw.v1.Classifier/Classify", request_serializer=_identity,
                          response_deserializer=_identity)  # fmt: skip


def _timed_gzip(data: bytes) -> float:
    """Seconds this client takes to gzip ``data`` (as gRPC does per call, at its default level)."""
    t0 = time.perf_counter()
    zlib.compress(data)
    return time.perf_counter() - t0


def _call(fn: grpc.UnaryUnaryMultiCallable, body: bytes, **kw: object) -> tuple[grpc.StatusCode, str, float]:
    t0 = time.perf_counter()
    try:
        fn(body, timeout=5, **kw)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""  # type: ignore[attr-defined]
    return code, details, time.perf_counter() - t0


# --- finding 1: the compressed empty-drawing bomb --------------------------------------------------------------


@pytest.mark.parametrize("with_token", [True, False], ids=["with-token", "without-token"])
def test_compressed_bomb_is_refused_before_decompression(token_gw: AttackedGateway, with_token: bool) -> None:
    """4,088 bytes of gzip that inflate to 2,097,144 empty drawings: request compression is off by default, so
    gRPC core refuses the call (UNIMPLEMENTED, "Compression algorithm 'gzip' is disabled") before a byte is
    decompressed, with or without a token, in well under 50 ms. gRPC compresses each call's 4 MiB on the client,
    inside the timed call: that gzip is measured here and taken off."""
    calls = 10
    client_s = min(_timed_gzip(BOMB) for _ in range(3))
    with grpc.insecure_channel(token_gw.target) as ch:
        fn = _raw_classify(ch)
        _call(fn, b"", metadata=AUTH)  # connected
        with measured(token_gw, f"compressed bomb {'with' if with_token else 'without'} a token", calls) as cost:
            results = [_call(fn, BOMB, compression=grpc.Compression.Gzip, metadata=AUTH if with_token else None)
                       for _ in range(calls)]  # fmt: skip
    for code, details, elapsed in results:
        assert code == grpc.StatusCode.UNIMPLEMENTED and "gzip" in details, (code, details)
        assert elapsed - client_s < REFUSAL_BOUND_S, f"refused in {elapsed * 1000:.1f} ms ({client_s * 1000:.1f} gzip)"
    print(f"[attack] compressed bomb refusals: {', '.join(f'{e * 1000:.1f}' for _, _, e in results)} ms, of which "
          f"the client's gzip {client_s * 1000:.1f} ms")
    cost.assert_bounds()


def test_uncompressed_bomb_is_refused_on_the_wire_count(gw: AttackedGateway) -> None:
    """The same 4 MiB sent uncompressed (the sender pays its size): the drawings are counted on the wire bytes
    and the call refused, naming the limit, before anything is parsed; as a stream message too, and nested
    one level down (one drawing of a million empty strokes)."""
    strokes = b"\x0a\x00" * 1_000_000  # Strokes.strokes: a million empty Stroke messages
    drawing = b"\x1a" + _varint(len(strokes)) + strokes  # Drawing.strokes
    nested = b"\x0a" + _varint(len(drawing)) + drawing  # ClassifyRequest.drawings
    assert len(pb.ClassifyRequest.FromString(nested).drawings[0].strokes.strokes) == 1_000_000
    calls = 12
    with grpc.insecure_channel(gw.target) as ch:
        fn = _raw_classify(ch)
        stream = ch.stream_stream("/quickdraw.v1.Classifier/ClassifyStream", request_serializer=_identity,
                                  response_deserializer=pb.ClassifyStreamResponse.FromString)  # fmt: skip
        _call(fn, b"")
        with measured(gw, "uncompressed bomb, nested bomb and 40 stream bombs", calls + 40) as cost:
            flat = [_call(fn, BOMB) for _ in range(calls // 2)]
            deep = [_call(fn, nested) for _ in range(calls // 2)]
            message = b"\x0a\x03b-1\x12" + _varint(len(BOMB)) + BOMB
            answers = list(stream(iter([message] * 40), timeout=30))
    for code, details, elapsed in flat:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_drawings_per_request=256" in details, details
        assert elapsed < 0.5
    for code, details, elapsed in deep:
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_strokes=256" in details, details
        assert elapsed < 0.5
    assert len(answers) == 40 and {a.id for a in answers} == {"b-1"}
    assert all(a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for a in answers)
    assert all("max_drawings_per_request" in a.error.message for a in answers)
    cost.assert_bounds()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


# --- finding 3: idle connections and the file-descriptor budget --------------------------------------------------


def _limits(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as fh:
        return next(line for line in fh if line.startswith("Max open files")).split()[3:5].__str__()


def test_idle_connections_do_not_block_new_clients(gw: AttackedGateway) -> None:
    """1,100 idle TCP connections to the gRPC port (and 1,100 to the HTTP port) from a gateway started with a
    soft limit of 1,024 descriptors: the gateway raised its soft limit to the hard one at start, so a new
    client is served at once; connections that never send the HTTP/2 preface are closed after
    --grpc-handshake-timeout-s (4 s here), and their descriptors are given back."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    limits = _limits(gw.pid)
    fds_before = open_fds(gw.pid)
    socks: list[socket.socket] = []
    try:
        with measured(gw, "2,200 idle connections", 2200) as cost:
            t_open = time.monotonic()
            for port in (int(gw.target.rsplit(":", 1)[1]), gw.http_port):
                for _ in range(1100):
                    socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                if port != gw.http_port:
                    opened_s = time.monotonic() - t_open
                    time.sleep(0.3)
                    fds_during = open_fds(gw.pid)  # the gRPC ones, before the handshake timeout closes them
            t0 = time.perf_counter()
            with grpc.insecure_channel(gw.target) as ch:
                resp = pb_grpc.ClassifierStub(ch).Classify(
                    pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bitmaps(1)[0]))]), timeout=5
                )
            new_client_s = time.perf_counter() - t0
        assert resp.predictions, "a new client was not served"
        print(f"[attack] idle connections: gateway limit (soft, hard) {limits}; fds {fds_before} -> {fds_during} "
              f"with 2,200 idle; a new client answered in {new_client_s * 1000:.0f} ms")  # fmt: skip
        assert new_client_s < 1.0
        assert opened_s < 3.0 and fds_during >= fds_before + 1100  # the gateway really held them
        cost.assert_bounds()
        # gRPC closes the ones that never finished the handshake (the HTTP side closes its own: test_attacks_http)
        deadline = time.monotonic() + 10
        grpc_socks = socks[:1100]
        closed = 0
        while time.monotonic() < deadline and closed < 1100:
            closed = sum(1 for s in grpc_socks if _peer_closed(s))
            time.sleep(0.25)
        print(f"[attack] {closed} of 1100 silent gRPC connections closed by the handshake timeout")
        assert closed == 1100
    finally:
        for s in socks:
            s.close()


def _peer_closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        data = s.recv(65536)
        while data:  # HTTP/2 settings frames the server sent; a closed socket then reads b""
            data = s.recv(65536)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


# --- finding 8: broadcast inputs on TF Serving's API --------------------------------------------------------------


def test_broadcast_predict_is_refused(gw: AttackedGateway) -> None:
    """``int_val=[7]`` with shape [256, 28, 28, 1]: 63 bytes that TF Serving would broadcast to 256 drawings
    (384 ms of CPU). Refused, naming the field, at the cost of a refusal."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "quickdraw"
    t = req.inputs["image"]
    t.dtype = types_pb2.DT_UINT8
    for d in (256, 28, 28, 1):
        t.tensor_shape.dim.add(size=d)
    t.int_val.append(7)
    assert req.ByteSize() <= 64
    calls = 20
    with grpc.insecure_channel(gw.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        codes = []
        with measured(gw, "broadcast Predict of 63 bytes", calls) as cost:
            for _ in range(calls):
                try:
                    stub.Predict(req, timeout=5)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)  # type: ignore[attr-defined]
                    details = exc.details()  # type: ignore[attr-defined]
    assert codes == ["INVALID_ARGUMENT"] * calls and "does not broadcast" in details
    cost.assert_bounds(cpu_bound_s=0.05)


# --- finding 9: idle streams ---------------------------------------------------------------------------------


def test_idle_streams_are_capped(gw: AttackedGateway) -> None:
    """Idle streams over 20 connections, half of them ClassifyStream and half the OIP's ModelStreamInfer: each
    connection carries at most 1,000 streams (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS) and the gateway keeps at
    most --max-open-streams open, both doors together (300 on this gateway; 1,000 by default); the rest get
    RESOURCE_EXHAUSTED at once, whichever door they came by, and grpc health and OIP ServerLive still answer
    while they are open (ModelStreamInfer was once outside the cap: 4,500 idle ones refused every health check)."""
    opened, connections, per_connection = 400, 20, 20
    methods = ("/quickdraw.v1.Classifier/ClassifyStream", "/inference.GRPCInferenceService/ModelStreamInfer")

    async def main() -> tuple[list[tuple[str, str]], float, bytes]:
        channels = [grpc.aio.insecure_channel(gw.target, options=[("grpc.channel_id", i)]) for i in range(connections)]
        never: asyncio.Event = asyncio.Event()

        async def nothing():  # type: ignore[no-untyped-def]
            await never.wait()
            yield b""

        calls = []
        for i in range(opened):
            ch = channels[i // per_connection]
            method = ch.stream_stream(methods[i % 2], request_serializer=_identity, response_deserializer=_identity)
            calls.append((methods[i % 2].rsplit("/", 1)[1], method(nothing(), timeout=30)))
        await asyncio.sleep(2.0)
        rss_during = gw.rss_mib()
        async with grpc.aio.insecure_channel(gw.target) as ch:  # a new client, while every slot is taken
            live = await ch.unary_unary("/inference.GRPCInferenceService/ServerLive", request_serializer=_identity,
                                        response_deserializer=_identity)(b"", timeout=5)  # fmt: skip
        outcomes = []
        for name, call in calls:
            if call.done():
                outcomes.append((name, (await call.code()).name))
            else:
                outcomes.append((name, "open"))
                call.cancel()
        for ch in channels:
            await ch.close()
        return outcomes, rss_during, live

    with measured(gw, f"{opened} idle streams (both doors) over {connections} connections", opened) as cost:
        outcomes, rss_during, live = asyncio.run(main())
    codes = [c for _, c in outcomes]
    refused = codes.count("RESOURCE_EXHAUSTED")
    by_door = {name: sum(1 for n, c in outcomes if n == name and c == "open") for name, _ in outcomes}
    print(f"[attack] idle streams: {codes.count('open')} open ({by_door}), {refused} refused; RSS with them open "
          f"{rss_during:.0f} MiB ({(rss_during - cost.rss_before_mib) * 1024 / max(1, codes.count('open')):.1f} "
          "KiB per open stream)")  # fmt: skip
    assert codes.count("open") == 300 and refused == opened - 300, outcomes
    assert all(by_door.values()), f"both doors take slots from the one cap: {by_door}"
    assert live == b"\x08\x01", f"OIP ServerLive while every stream slot was taken: {live!r}"
    cost.assert_bounds()


def test_oip_wire_count_cannot_be_bypassed_by_leading_fields(gw: AttackedGateway) -> None:
    """ModelInfer is counted on the wire before parsing; 81 empty ``id`` fields in front (162 bytes) once stopped
    the count early and let 2 million empty inputs through to the parser (4.4 s of stalled health, +400 MiB kept;
    5.6 s on ModelStreamInfer, whose error path parsed the message again to read its id). Now both are refused
    unparsed, naming the request, within the attack bounds; the stream answers the refusal and goes on."""
    bomb = b"\x1a\x00" * 81 + b"\x2a\x00" * 2_000_000  # id = "" x 81, then 2,000,000 empty inputs
    good = oip.ModelInferRequest(model_name="quickdraw", id="ok", raw_input_contents=[bytes(784)])
    good.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
    good = good.SerializeToString()
    with grpc.insecure_channel(gw.target) as ch:
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=_identity,
                               response_deserializer=_identity)  # fmt: skip
        stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=_identity,
                                  response_deserializer=oip.ModelStreamInferResponse.FromString)  # fmt: skip
        with measured(gw, "OIP: 81 empty ids, then 2,000,000 empty inputs (unary x3, stream x3)", 6) as cost:
            codes = []
            for _ in range(3):
                try:
                    infer(bomb, timeout=30)
                    codes.append(("OK", ""))
                except grpc.RpcError as exc:
                    codes.append((exc.code().name, exc.details() or ""))  # type: ignore[attr-defined]
            answers = list(stream(iter([bomb, bomb, bomb, good]), timeout=60))
    for code, details in codes:
        assert code == "INVALID_ARGUMENT" and "refused before parsing" in details, (code, details)
    assert [bool(a.error_message) for a in answers] == [True, True, True, False], answers
    assert all("refused before parsing" in a.error_message for a in answers[:3]), answers[0].error_message
    assert answers[3].infer_response.id == "ok", answers[3]
    cost.assert_bounds()


# --- finding 10: echoed input and violation counts ---------------------------------------------------------------


def test_error_answers_are_bounded(gw: AttackedGateway) -> None:
    """A 3 MB output_filter name is echoed at most ``MAX_MESSAGE_CHARS`` characters (it once made a 5 MB
    grpc-message), and 250 bad drawings get as many field violations as fit in ``MAX_STATUS_BYTES`` plus one that
    counts the rest (two million of them once overflowed the trailer; 100 of them made an 8.6 KB trailer, which a
    default client refuses at random past gRPC's 8 KiB soft limit: RESOURCE_EXHAUSTED instead of the error), every
    time of 20."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "quickdraw"
    t = req.inputs["image"]
    t.dtype = types_pb2.DT_UINT8
    for d in (1, 28, 28, 1):
        t.tensor_shape.dim.add(size=d)
    t.tensor_content = bitmaps(1)[0]
    req.output_filter.append("x" * 3_000_000)
    bad = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=b"\x00" * 3))] * 250)
    with grpc.insecure_channel(gw.target, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert len(err.value.details()) <= MAX_MESSAGE_CHARS  # type: ignore[attr-defined]
        codes = []
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as err2:
                pb_grpc.ClassifierStub(ch).Classify(bad, timeout=10)
            codes.append(err2.value.code())  # type: ignore[attr-defined]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 20, codes
    status = rpc_status.from_call(err2.value)  # type: ignore[arg-type]
    assert status.ByteSize() <= MAX_STATUS_BYTES
    detail = error_details_pb2.BadRequest()
    status.details[0].Unpack(detail)
    listed = len(detail.field_violations) - 1
    assert 10 <= listed <= MAX_VIOLATIONS
    assert f"and {250 - listed} more violations not listed" in detail.field_violations[-1].description
    fields = [v.field for v in detail.field_violations[:listed]]
    assert fields == [f"drawings[{i}].bitmap.pixels" for i in range(listed)]
    print(f"[attack] echoed 3 MB name: {len(err.value.details())} characters; 250 bad drawings: "  # type: ignore[attr-defined]
          f"{len(detail.field_violations)} violations, status {status.ByteSize()} bytes (bound {MAX_STATUS_BYTES})")


def test_a_low_descriptor_limit_meets_the_caps_not_emfile() -> None:
    """A gateway whose hard limit is only 400 descriptors: its connection caps are lowered to fit (logged), so
    1,000 idle connections to each port meet the caps, not EMFILE; accept errors, if any, are logged at most
    once per 10 s; and a new gRPC client is served once the handshake timeout (2 s) has closed the silent ones."""
    g = AttackedGateway("--model-dir", str(SHIPPED_MODEL), "--grpc-handshake-timeout-s", "2", nofile=(400, 400))
    socks: list[socket.socket] = []
    try:
        _warm(g.target)
        assert "connection caps lowered" in g.output(), g.output()[-2000:]
        with measured(g, "2,000 idle connections under a 400-descriptor limit", 2000) as cost:
            for port in (int(g.target.rsplit(":", 1)[1]), g.http_port):
                for _ in range(1000):
                    with contextlib.suppress(OSError):  # a full listen backlog: the kernel turned it away
                        socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            peak = open_fds(g.pid)
            time.sleep(2.5)
            t0 = time.perf_counter()
            with grpc.insecure_channel(g.target) as ch:
                resp = pb_grpc.ClassifierStub(ch).Classify(
                    pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bitmaps(1)[0]))]), timeout=10
                )
            served_s = time.perf_counter() - t0
        accept_lines = [line for line in g.output().splitlines() if "accept" in line.lower()]
        print(f"[attack] 400-descriptor limit: peak {peak} descriptors; a new client served in "
              f"{served_s * 1000:.0f} ms after the handshake timeout; {len(accept_lines)} accept error line(s) logged")
        assert resp.predictions and peak < 400
        assert len(accept_lines) <= 2, accept_lines
        cost.assert_bounds()
    finally:
        for s in socks:
            s.close()
        g.kill()
