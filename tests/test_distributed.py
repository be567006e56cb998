"""Multi-worker training: two worker processes on localhost, MultiWorkerMirroredStrategy via TF_CONFIG."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_two_workers_finish_with_identical_weights_and_one_export(sample: Path, tmp_path: Path) -> None:
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    out, workdir = tmp_path / "models", tmp_path / "run"
    procs = []
    for index in range(2):
        env = {
            **os.environ,
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        }
        cmd = [sys.executable, "-m", "quickdraw", "train", "--data", str(sample), "--classes", "cat,dog",
               "--per-class", "192", "--epochs", "2", "--batch-size", "64", "--threads", "1", "--tta", "none",
               "--out", str(out), "--workdir", str(workdir)]
        log = (tmp_path / f"worker{index}.log").open("w")
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2)]
    assert codes == [0, 0], logs
    digests = [(workdir / f"weights-worker-{i}.sha256").read_text().strip() for i in range(2)]
    print(f"\nworker weight digests: {digests[0][:16]}... {digests[1][:16]}...")
    assert digests[0] == digests[1]
    assert sorted(p.name for p in out.iterdir()) == ["1"]  # exactly one export, by the chief
    card = json.loads((out / "1" / "model_card.json").read_text())
    assert card["workers"] == 2
    assert "exported" in logs[0] and "exported" not in logs[1]
