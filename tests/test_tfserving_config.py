"""deploy/tfserving/ and deploy/docker-compose.yml agree with TF Serving's schemas and with the gateway's code.

``models.config`` is parsed with TF Serving's own ``model_server_config_pb2``; ``batching.config`` and
``monitoring.config`` with the messages compiled from TF Serving's schemas in protos/quickdraw/tfserving_schema/.
The compose file is parsed and its ports, paths, environment and commands are checked against ``Settings``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from quickdraw.tfserving_schema import batching_parameters_pb2, monitoring_config_pb2
from service.backends import find_versions
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
TFS = DEPLOY / "tfserving"


def parse(path: Path, message: Any) -> Any:
    return text_format.Parse(path.read_text(), message)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def flags(command: list[str]) -> dict[str, str]:
    out = {}
    for arg in command:
        m = re.fullmatch(r"--([a-z_.]+)=(.*)", arg)
        assert m, f"unexpected argument {arg!r}"
        out[m.group(1)] = m.group(2)
    return out


def test_models_config_parses_with_tf_servings_own_schema() -> None:
    cfg = parse(TFS / "models.config", model_server_config_pb2.ModelServerConfig())
    (model,) = cfg.model_config_list.config
    assert model.name == Settings().model_name
    assert model.base_path == "/models/quickdraw"
    assert model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    assert model.model_version_policy.latest.num_versions >= 1


def test_batching_config_parses_and_fits_the_gateway() -> None:
    b = parse(TFS / "batching.config", batching_parameters_pb2.BatchingParameters())
    for field in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        assert b.HasField(field) and getattr(b, field).value > 0, field
    sizes = list(b.allowed_batch_sizes)
    assert sizes == sorted(set(sizes)) and sizes[-1] == b.max_batch_size.value  # TF Serving's own rule
    # a full gateway batch must fit in one TF Serving batch, or TF Serving rejects it
    assert Settings().max_batch_size <= b.max_batch_size.value


def test_monitoring_config_enables_prometheus_on_the_scraped_path() -> None:
    m = parse(TFS / "monitoring.config", monitoring_config_pb2.MonitoringConfig())
    assert m.prometheus_config.enable
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    assert jobs["tfserving"]["metrics_path"] == m.prometheus_config.path


def test_compose_tfserving_serves_the_models_with_these_configs(compose: dict[str, Any]) -> None:
    tfs = compose["services"]["tfserving"]
    assert re.fullmatch(r"\$\{TFSERVING_IMAGE:-tensorflow/serving:[\d.]+\}", tfs["image"])
    f = flags(tfs["command"])
    mounts = dict(v.rsplit(":", 2)[:2] for v in tfs["volumes"])
    config_dir = next(c for h, c in mounts.items() if (DEPLOY / h).resolve() == TFS.resolve())
    for key, name in (("model_config_file", "models.config"), ("batching_parameters_file", "batching.config"),
                      ("monitoring_config_file", "monitoring.config")):  # fmt: skip
        assert f[key] == f"{config_dir}/{name}" and (TFS / name).exists()
    assert f["enable_batching"] == "true"
    # the base_path in models.config is inside the mounted models directory, which holds real versions
    base = parse(TFS / "models.config", model_server_config_pb2.ModelServerConfig()).model_config_list.config[0]
    host, container = next((h, c) for h, c in mounts.items() if base.base_path.startswith(c + "/"))
    assert find_versions((DEPLOY / host / base.base_path[len(container) + 1 :]).resolve())
    ports = {p.split(":")[1].split()[0] for p in tfs["ports"]}
    assert {f["port"], f["rest_api_port"]} <= ports


def test_compose_gateway_environment_is_valid_settings(compose: dict[str, Any], tmp_path: Path) -> None:
    gw = compose["services"]["gateway"]
    env = gw["environment"]
    names = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items()}
    unknown = set(names) - set(Settings.model_fields)
    assert not unknown, f"compose sets variables the gateway does not read: {unknown}"
    settings = Settings(**names)  # every value validates
    assert settings.backend == "tfserving"
    # the target names the tfserving service and its gRPC port
    tfs_port = flags(compose["services"]["tfserving"]["command"])["port"]
    assert settings.tfserving_target in (f"tfserving:{tfs_port}", f"dns:///tfserving:{tfs_port}")
    ports = {p.split(":")[1].split()[0] for p in gw["ports"]}
    assert {str(settings.grpc_port), str(settings.http_port)} <= ports
    # labels: the model dir inside the container is a mounted path with labels.txt on the host
    mounts = dict(v.rsplit(":", 2)[:2] for v in gw["volumes"])
    host, container = next((h, c) for h, c in mounts.items() if str(settings.model_dir).startswith(c))
    host_dir = (DEPLOY / host / str(settings.model_dir)[len(container) :].lstrip("/")).resolve()
    assert (host_dir / str(find_versions(host_dir)[-1]) / "assets" / "labels.txt").exists()
    # the image it builds exists, and compose stops it after the gateway's own drain
    assert (ROOT / gw["build"]["dockerfile"]).exists() or pytest.fail(f"missing {gw['build']['dockerfile']}")
    assert float(gw["stop_grace_period"].rstrip("s")) > settings.shutdown_grace_s


def test_compose_prometheus_scrapes_the_gateway_metrics_port(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    host_cfg = next(v.split(":")[0] for v in prom["volumes"] if v.split(":")[1] == "/etc/prometheus/prometheus.yml")
    scrape = yaml.safe_load((DEPLOY / host_cfg).read_text())
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    http_port = compose["services"]["gateway"]["environment"]["QUICKDRAW_HTTP_PORT"]
    assert jobs["quickdraw-gateway"]["static_configs"][0]["targets"] == [f"gateway:{http_port}"]
    assert jobs["quickdraw-gateway"].get("metrics_path", "/metrics") == "/metrics"
    rest = flags(compose["services"]["tfserving"]["command"])["rest_api_port"]
    assert jobs["tfserving"]["static_configs"][0]["targets"] == [f"tfserving:{rest}"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); the static checks above ran")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / host_cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
