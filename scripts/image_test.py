"""``make image-test``: the slim gateway image, run with podman, against the TF Serving stand-in.

The stand-in runs as a host process (the main virtualenv has TensorFlow); the gateway container shares the
host's network, with a read-only root filesystem and a tmpfs on /tmp as in Kubernetes. Checked: no TensorFlow
in the image or in the running gateway's memory map, SERVING soon after start, a classification, the health
services, and a SIGTERM drain (calls in flight finish OK, exit 0). Printed: the image sizes; the slim image
must add less than 200 MB to its base. When the full image is there, ``quickdraw predict`` runs in it too.
Build the images first: ``make images``.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the stand-in's TensorFlow, and what the test imports
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from faults import bitmaps, free_port, start_standin  # noqa: E402

from quickdraw_client.v1 import classifier_pb2 as pb  # noqa: E402
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc  # noqa: E402

TAG = os.environ.get("TAG", "0.1.0")
GATEWAY = os.environ.get("GATEWAY_IMAGE", f"localhost/quickdraw-gateway:{TAG}")
FULL = f"localhost/quickdraw-full:{TAG}"
BASE = os.environ.get("PYTHON_IMAGE", "localhost/quickdraw-base:bookworm")
SLIM_ADDS_LIMIT_MB = 200
GRACE_S = 10
FAILED: list[str] = []
NOT_YET = (" (the tfserving gateway still imports TensorFlow: expected until the vendored TF Serving protos,"
           " branch i16-protos, are merged)")
LIST_DISTS = ("import importlib.metadata as m, json; "
              "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))")  # fmt: skip


def podman(*args: str, check: bool = True, timeout: float = 300) -> str:
    """Run ``podman ARGS``; its stdout."""
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"podman {' '.join(args[:3])}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done.stdout


def logs(name: str) -> str:
    """The container's output: ``podman logs`` writes its stdout and its stderr to its own."""
    done = subprocess.run(["podman", "logs", name], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def size_mb(image: str) -> float:
    """The image's size as podman reports it, in MB (10^6 bytes)."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", image).strip()) / 1e6


def health(target: str, service: str = "") -> str:
    """grpc.health.v1 status, or the gRPC code's name when the call fails."""
    with grpc.insecure_channel(target) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError as exc:
            return exc.code().name  # type: ignore[no-any-return, attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def check(ok: bool, what: str) -> bool:
    """Print the check and its outcome; a failure is counted, and the run goes on."""
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        FAILED.append(what)
    return ok


def main() -> int:
    """Run every check; 0 when all pass."""
    for image in (BASE, GATEWAY):
        if subprocess.run(["podman", "image", "exists", image]).returncode != 0:
            print(f"image-test: no image {image}: run `make images` first", file=sys.stderr)
            return 2
    sizes = {image: size_mb(image) for image in (BASE, GATEWAY, FULL)
             if subprocess.run(["podman", "image", "exists", image]).returncode == 0}  # fmt: skip
    print("image-test: sizes (podman image inspect)")
    for image, mb in sizes.items():
        extra = f"  (+{mb - sizes[BASE]:.1f} MB on the base)" if image != BASE else ""
        print(f"  {image:40s} {mb:8.1f} MB{extra}")
    adds = sizes[GATEWAY] - sizes[BASE]
    check(adds < SLIM_ADDS_LIMIT_MB, f"the slim gateway image adds {adds:.1f} MB to its base (< {SLIM_ADDS_LIMIT_MB})")

    dists = json.loads(podman("run", "--rm", "--network=none", "--entrypoint", "python", GATEWAY, "-c", LIST_DISTS))
    heavy = [d for d in dists if d.replace("_", "-") in {"tensorflow", "tensorflow-serving-api", "tensorboard",
                                                         "keras", "matplotlib", "grpcio-tools"}]  # fmt: skip
    check(not heavy, f"no TensorFlow in the slim image ({len(dists)} distributions; heavy ones: {heavy})")

    port = free_port()
    standin = start_standin(port)
    grpc_port, http_port = free_port(), free_port()
    name = f"quickdraw-image-test-{os.getpid()}"
    target = f"127.0.0.1:{grpc_port}"
    try:
        started = time.monotonic()
        podman("run", "-d", "--name", name, "--network=host", "--read-only", "--tmpfs", "/tmp",
               "-e", "QUICKDRAW_BACKEND=tfserving", "-e", "QUICKDRAW_HOST=127.0.0.1",
               "-e", f"QUICKDRAW_GRPC_PORT={grpc_port}", "-e", f"QUICKDRAW_HTTP_PORT={http_port}",
               "-e", f"QUICKDRAW_TFSERVING_TARGET=127.0.0.1:{port}",
               "-e", f"QUICKDRAW_SHUTDOWN_GRACE_S={GRACE_S}", GATEWAY)  # fmt: skip
        while (status := health(target)) != "SERVING":
            running = podman("inspect", "--format", "{{.State.Running}}", name).strip() == "true"
            if not running or time.monotonic() - started > 60:
                out = logs(name)[-3000:]
                why = NOT_YET if "quickdraw-service[tf]" in out else ""
                check(False, f"the gateway container never got SERVING ({status}; running: {running}){why}; its log:\n"
                      + "\n".join("      " + ln for ln in out.splitlines()))
                return finish()
            time.sleep(0.05)
        check(True, f"SERVING {time.monotonic() - started:.2f} s after `podman run` (TF Serving up)")
        check(health(target, "liveness") == "SERVING", "health 'liveness' SERVING")

        cats = bitmaps(16)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            resp = stub.Classify(pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=b)) for b in cats],
                                                    top_k=3), timeout=30)  # fmt: skip
            tops = [p.top[0].label for p in resp.predictions]
            check(len(tops) == len(cats), f"classified {len(tops)} bitmaps: {', '.join(tops[:8])} ...")
            if len(cats) > 1:  # the sample's cats, not the fallback square
                check(tops.count("cat") >= len(cats) * 3 // 4, f"{tops.count('cat')}/{len(cats)} are cats")
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            check(info.backend == "tfserving", f"backend {info.backend}, model {info.name} v{info.default_version}")

        pid = int(podman("inspect", "--format", "{{.State.Pid}}", name).strip())
        maps = Path(f"/proc/{pid}/maps").read_text()
        tf = sorted({ln.split()[-1] for ln in maps.splitlines() if "tensorflow" in ln.lower()})
        check(not tf, f"no TensorFlow library in the gateway's memory map (pid {pid} on the host)")
        with open(f"/proc/{pid}/status") as fh:
            rss = next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) / 1024
        print(f"      gateway RSS {rss:.0f} MiB")

        # SIGTERM with calls in flight: the stand-in is slow (restarted with --standin_delay_ms), so they are still
        # waiting when the signal lands.
        standin.kill()
        standin = start_standin(port, "--standin_delay_ms", "800")
        while health(target) != "SERVING":
            time.sleep(0.05)
        with grpc.insecure_channel(target) as ch, concurrent.futures.ThreadPoolExecutor(16) as pool:
            stub = pb_grpc.ClassifierStub(ch)
            req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=cats[0]))])
            stub.Classify(req, timeout=30)  # connected and warm
            calls = [pool.submit(stub.Classify, req, timeout=30) for _ in range(16)]
            time.sleep(0.3)
            t0 = time.monotonic()
            podman("kill", "--signal", "TERM", name)
            codes = []
            for f in calls:
                try:
                    f.result()
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)  # type: ignore[attr-defined]
        exit_code = int(podman("wait", name, timeout=GRACE_S + 30).strip())
        took = time.monotonic() - t0
        check(codes == ["OK"] * len(codes), f"SIGTERM: the {len(codes)} calls in flight all finished OK")
        check(exit_code == 0 and took < GRACE_S + 5, f"SIGTERM: exit {exit_code} {took:.1f} s after the signal")
        print("      " + "\n      ".join(ln for ln in logs(name).splitlines()[-4:]))
    finally:
        podman("rm", "-f", name, check=False)
        standin.kill()

    if FULL in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            np.save(Path(tmp) / "cats.npy", np.stack([np.frombuffer(b, np.uint8) for b in cats[:4]]))
            os.chmod(tmp, 0o755)
            t0 = time.monotonic()
            out = podman("run", "--rm", "--network=none", "-v", f"{tmp}:/in:ro", FULL, "predict", "--model",
                         "/models/quickdraw", "/in/cats.npy")  # fmt: skip
            lines = out.strip().splitlines()
            check(len(lines) == 4, f"the full image: `quickdraw predict` in {time.monotonic() - t0:.1f} s: {lines[:1]}")
    return finish()


def finish() -> int:
    """The summary line and the exit code."""
    if FAILED:
        print(f"image-test: {len(FAILED)} check(s) FAILED")
        return 1
    print("image-test: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
