"""The ``kserve`` SDK's gRPC client (PyPI) against a real gateway speaking the Open Inference Protocol.

The SDK cannot share the project's virtualenv: kserve 0.21 needs protobuf<7 (the project pins protobuf>=7.35), and
its generated ``inference`` protos would clash with tritonclient's in one process. So, as tests/test_slim.py does for
the slim install, the test builds a virtualenv of its own, cached under ``build/kserve-venv/<key>`` (the key: the
kserve pin, Python's version and the install recipe) so that a second run reuses it. The install is lean:
``pip install --no-deps kserve==KSERVE`` and then kserve's own requirements except those that
``import kserve.inference_client`` never imports (``SKIPPED``; ``uvicorn`` without its ``[standard]`` extra), with
``--no-compile``. ``import kserve`` runs the package's ``__init__``, which imports the whole SDK (the model server,
the Kubernetes client, pandas), so the rest of the requirements are needed.

A ``quickdraw serve`` process (embedded backend, free ports) serves the shipped model; a script run in the kserve
virtualenv (``kserve_side``, below, sent as source) uses ``kserve.InferenceGRPCClient`` for liveness, readiness
and ModelInfer, and the SDK's generated ``GRPCInferenceServiceStub`` for ModelMetadata (the client has no method
for it). It sends 64 sample bitmaps in one ModelInfer as UINT8 [64,28,28,1] (raw contents, then typed
``uint_contents``), and an unknown model. The outputs (``probabilities``, and ``known_score`` when the shipped
model has it) must equal the offline SavedModel's within 1e-5.

Runtime on 2 shared cores (load 1-4): 19-58 s on a first run with no pip cache (the virtualenv: 8-45 s, 57
distributions, 231 MiB before its first imports write bytecode, built while the gateway starts); 11-19 s cached (the
gateway's start and TensorFlow's load for the offline answer). Against a plain ``pip install kserve`` the lean
install saves ~50 MiB and 9 distributions, and about as much time (8 s against 10 s, measured at load 1).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import sample_dir
from faults import gateway
from harness import SHIPPED_MODEL

from doodle.formats import open_bitmaps
from service.backends import find_versions

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}"),
]

ROOT = Path(__file__).resolve().parents[1]
KSERVE = "0.21.0"
#: kserve's requirements that ``import kserve.inference_client`` never imports and nothing else brings (measured on
#: kserve 0.21.0 with ``importlib.metadata.packages_distributions`` over the modules the import added; aiohttp is
#: not imported either, but the Kubernetes client requires it).
SKIPPED = ("cryptography", "pillow", "pyjwt", "pyasn1")
#: Bump when the recipe in ``build_kserve_venv`` changes: a new key means a new cached virtualenv.
RECIPE = 2
CACHE = ROOT / "build" / "kserve-venv"
#: pip's words for "no network" (a missing or unresolvable package is a failure, not a skip).
OFFLINE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
           "Failed to establish a new connection", "ProxyError")  # fmt: skip
MODEL = "quickdraw"
BATCH = 64


def venv_key() -> str:
    """The cached virtualenv's folder name: the kserve pin, Python's version, and a hash of the recipe."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256(json.dumps([KSERVE, py, sorted(SKIPPED), RECIPE]).encode()).hexdigest()[:10]
    return f"kserve-{KSERVE}-py{py}-{digest}"


def pip(venv: Path, *args: str) -> None:
    """``pip install`` into ``venv``; skips when no package index is reachable, fails on anything else.

    The running interpreter's pip installs into the virtualenv (``pip --python``), which then needs no pip of its
    own: ``python -m venv`` takes ~0.05 s without one and 5-8 s with one here."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if (venv / "bin" / "pip").exists():  # made with its own pip (the running interpreter has none)
        run = [str(venv / "bin" / "python"), "-m", "pip"]
    else:
        run = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    cmd = [*run, "install", "--quiet", "--disable-pip-version-check", "--no-compile", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    offline = [ln for ln in done.stderr.splitlines() if any(s in ln for s in OFFLINE)]
    if done.returncode != 0 and offline:
        pytest.skip(f"pip reaches no package index from here: {offline[-1][:300]}")
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def build_kserve_venv() -> tuple[Path, str]:
    """The kserve virtualenv (built once per key, under a lock) and a line saying how it was got."""
    CACHE.mkdir(parents=True, exist_ok=True)
    venv = CACHE / venv_key()
    stamp = venv / "complete.json"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file():
            return venv, f"cached ({venv.relative_to(ROOT)})"
        for old in CACHE.iterdir():  # an unfinished build, or one of an older key
            if old.is_dir():
                shutil.rmtree(old)
        started = time.monotonic()
        bare = ["--without-pip"] if importlib.util.find_spec("pip") else []  # see pip()
        subprocess.run([sys.executable, "-m", "venv", *bare, str(venv)], check=True, timeout=120)
        pip(venv, "--no-deps", f"kserve=={KSERVE}")
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-I", "-c",
             "import importlib.metadata as m, json; print(json.dumps(m.requires('kserve')))"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        wanted = []
        for req in json.loads(probe.stdout):
            spec = req.split(";")[0].strip()
            dist = re.match(r"[A-Za-z0-9_.-]+", spec)
            if "extra ==" in req or dist is None or dist.group(0).lower() in SKIPPED:
                continue
            wanted.append(spec.replace("uvicorn[standard]", "uvicorn"))
        pip(venv, *wanted)
        took = time.monotonic() - started
        info = subprocess.run(
            [str(venv / "bin" / "python"), "-I", "-c",
             "import importlib.metadata as m, json, sysconfig; print(json.dumps({'site': sysconfig.get_paths()"
             "['purelib'], 'dists': {d.metadata['Name'].lower(): d.version for d in m.distributions()}}))"],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        found = json.loads(info.stdout)
        site = Path(found["site"])
        size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())
        stamp.write_text(json.dumps({"install_s": round(took, 1), "site_mib": round(size / 2**20),
                                     "dists": found["dists"]}, indent=1, sort_keys=True) + "\n")  # fmt: skip
        d = found["dists"]
        return venv, (f"built in {took:.1f} s; site-packages {size / 2**20:.0f} MiB; {len(d)} distributions "
                      f"(grpcio {d.get('grpcio')}, protobuf {d.get('protobuf')}, numpy {d.get('numpy')})")  # fmt: skip


def kserve_side(target: str, images_path: str, out_path: str) -> None:
    """Runs in the kserve virtualenv (sent as source): the SDK's gRPC client against ``target``; writes the
    probabilities of raw and of typed contents to ``out_path`` (.npz) and prints a JSON report."""
    import asyncio
    import json

    import grpc
    import kserve
    import numpy as np
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as v2
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    images = np.load(images_path)
    report: dict[str, Any] = {"kserve": kserve.__file__}

    def request(model: str, binary: bool) -> kserve.InferRequest:
        image = kserve.InferInput("image", list(images.shape), "UINT8")
        image.set_data_from_numpy(images, binary_data=binary)
        return kserve.InferRequest(model_name=model, infer_inputs=[image])

    async def main() -> None:
        client = kserve.InferenceGRPCClient(target, timeout=60, retries=0)
        report["live"] = await client.is_server_live()
        report["ready"] = await client.is_server_ready()
        report["model_ready"] = await client.is_model_ready("quickdraw")
        async with grpc.aio.insecure_channel(target) as ch:
            meta = await GRPCInferenceServiceStub(ch).ModelMetadata(v2.ModelMetadataRequest(name="quickdraw"))
        report["metadata"] = {
            "name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in meta.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in meta.outputs],
        }  # fmt: skip
        probs = {}
        for form, binary in (("raw", True), ("typed", False)):
            sent = request("quickdraw", binary).to_grpc()
            report[f"{form}_request_has_raw_contents"] = len(sent.raw_input_contents) == 1
            response = await client.infer(request("quickdraw", binary))
            report[form] = {"model_name": response.model_name, "model_version": response.model_version,
                            "outputs": [[o.name, o.datatype, list(o.shape)] for o in response.outputs]}  # fmt: skip
            probs.update({f"{form}/{o.name}": o.as_numpy() for o in response.outputs})
        np.savez(out_path, **probs)
        try:
            await client.infer(request("sketches", True))
            report["unknown_model"] = {"code": "OK"}
        except grpc.RpcError as exc:
            report["unknown_model"] = {"code": exc.code().name, "details": exc.details()}  # type: ignore[attr-defined]
        await client.close()

    asyncio.run(main())
    print("REPORT " + json.dumps(report))


def sample_bitmaps(n: int) -> np.ndarray:
    """``n`` real bitmaps, round-robin over the sample classes, as UINT8 [n,28,28,1]."""
    files = sorted((sample_dir() / "numpy_bitmap").glob("*.npy"))
    if not files:
        pytest.skip(f"Quick, Draw! sample data not found at {sample_dir()} (set QUICKDRAW_SAMPLE_DIR)")
    per = -(-n // len(files))
    rows = np.concatenate([np.asarray(open_bitmaps(f)[:per]) for f in files])[:n]
    return rows.reshape(-1, 28, 28, 1).astype(np.uint8)


def offline_outputs(images: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
    """The offline SavedModel's outputs (the highest version, as the gateway serves) and that version:
    ``probabilities``, and ``known_score`` when the model makes the out-of-class decision."""
    import tensorflow as tf

    version = find_versions(SHIPPED_MODEL)[-1]
    loaded = tf.saved_model.load(str(SHIPPED_MODEL / str(version)))
    got = loaded.signatures["serving_default"](image=tf.constant(images))
    return {name: got[name].numpy() for name in ("probabilities", "known_score") if name in got}, version


def test_kserve_sdk_grpc_client_gets_the_offline_probabilities(tmp_path: Path) -> None:
    started = time.monotonic()
    images = sample_bitmaps(BATCH)
    np.save(tmp_path / "images.npy", images)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        building = pool.submit(build_kserve_venv)  # pip works while the gateway loads TensorFlow
        with gateway("--backend", "embedded", "--model-dir", str(SHIPPED_MODEL)) as gw:
            venv, how = building.result()
            print(f"\nkserve {KSERVE} virtualenv: {how}")
            script = textwrap.dedent(inspect.getsource(kserve_side))
            script = f"from typing import Any\n{script}\nimport sys\nkserve_side(*sys.argv[1:])\n"
            (tmp_path / "kserve_side.py").write_text(script)
            t0 = time.monotonic()
            done = subprocess.run(
                [str(venv / "bin" / "python"), "-I", str(tmp_path / "kserve_side.py"), gw.target,
                 str(tmp_path / "images.npy"), str(tmp_path / "probs.npz")],
                capture_output=True, text=True, timeout=300, cwd=tmp_path,
            )  # fmt: skip
            client_s = time.monotonic() - t0
            assert done.returncode == 0, f"kserve client failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
            metrics = gw.scrape()
    report = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("REPORT "))[len("REPORT ") :])
    assert report["kserve"].startswith(str(venv)), report["kserve"]  # the SDK from PyPI, not something else

    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    offline, version = offline_outputs(images)
    classes = offline["probabilities"].shape[1]
    meta = report["metadata"]
    assert meta["name"] == MODEL and meta["versions"] == [str(version)], meta
    assert ["image", "UINT8", [-1, 28, 28, 1]] in meta["inputs"], meta
    shapes = {"probabilities": [-1, classes], "known_score": [-1]}  # known_score: with an out-of-class model
    assert meta["outputs"] == [[name, "FP32", shapes[name]] for name in offline], meta

    probs = np.load(tmp_path / "probs.npz")
    assert report["raw_request_has_raw_contents"] is True and report["typed_request_has_raw_contents"] is False
    for form in ("raw", "typed"):
        outputs = [[name, "FP32", [BATCH, *shapes[name][1:]]] for name in offline]
        assert report[form] == {"model_name": MODEL, "model_version": str(version), "outputs": outputs}, form
        for name, want in offline.items():
            assert probs[f"{form}/{name}"].dtype == np.float32
            np.testing.assert_allclose(probs[f"{form}/{name}"], want, atol=1e-5, err_msg=f"{name}, {form} contents")
    assert metrics['quickdraw_request_duration_seconds_count{code="OK",method="ModelInfer"}'] >= 2

    unknown = report["unknown_model"]
    assert unknown["code"] == "NOT_FOUND", unknown
    assert "Request for unknown model: 'sketches' is not found" in unknown["details"], unknown
    print(
        f"kserve client script {client_s:.1f} s; test {time.monotonic() - started:.1f} s; "
        f"outputs {list(offline)}; max |gateway - offline| "
        f"{max(np.abs(probs[f'{f}/{n}'] - w).max() for f in ('raw', 'typed') for n, w in offline.items()):.2e}; "
        f"unknown model: {unknown['code']} "
        f"{unknown['details']!r}"
    )
