"""deploy/: Kubernetes manifests, container build files, Prometheus rules, adapter rules and the Grafana dashboard.

- Every kustomization (base, overlays/gpu, overlays/cpu) is rendered by real kustomize (``kubectl kustomize``,
  kustomize v5 built into kubectl, which this kind of machine ships; a standalone ``kustomize`` is used when on
  PATH) and every rendered object validates, strictly (unknown fields are errors), against the Kubernetes
  OpenAPI schemas of ``K8S_VERSION`` shipped by the ``kubernetes-validate`` package.
- Every file a kustomization names exists; every path a Dockerfile copies exists and is let in by .dockerignore.
- The rendered objects hang together: probes, ports, labels, grace periods, GPU scheduling, HPA metrics.
- What a platform team would otherwise trip on: no ``replicas`` in a Deployment an HPA manages; TF Serving keeps
  2 replicas and its PodDisruptionBudget never lets the last go; the gateway's grace period is the sum of its
  preStop, drain and a named margin; the model volume is read-only for every server container and written only
  by the model loader (an init container that seeds an empty volume; its script is run here on real
  directories, two copies racing) and the trainer Job; no nodeSelector needs GPU feature discovery unless opted
  in; the gateway HPA scales on CPU.
- Day one: each overlay renders with its Secrets (defined, issued by cert-manager, or created by a command in
  deploy/README.md), its model loader and, with every optional component (tls, cert-manager, gateway-api,
  prometheus-operator), validates (CRD kinds have no schema in kubernetes-validate: their references are
  checked instead); the tls component's exec probes pass against a real TLS gateway; images and the storage
  class are set in one place; the prometheus-operator component is what scripts/gen_prometheus_operator.py
  makes of deploy/prometheus now.
- ``promtool check config``, ``check rules`` and ``test rules`` pass; every alert links its docs/runbooks.md
  section and names no namespace. promtool comes from Debian's ``prometheus``
  package, installed here when missing (as root, with apt); without it these tests skip and say why.
- A real Prometheus, started on a free port, scrapes a real gateway (``RunningGateway``) under load through
  the scrape job and relabelling of deploy/prometheus/prometheus.yml, evaluates the recording rules, and
  answers every recording rule's and every prometheus-adapter rule's PromQL, read from the files; another
  scrapes the TF Serving stand-in and answers TF Serving's recording rules.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from harness import SHIPPED_MODEL, RunningGateway

from service.backends import find_versions
from service.core.metrics import Metrics
from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
#: The Kubernetes version every manifest is validated against (its API schemas ship in kubernetes-validate).
K8S_VERSION = "1.32.0"
TARGETS = ["base", "overlays/gpu", "overlays/cpu"]
#: The claim holding the SavedModels, and the opt-in kustomizations next to TARGETS.
MODELS_CLAIM = "quickdraw-models"
TRAINER = "trainer"
GPU_NODE_SELECTOR = K8S / "components" / "gpu-node-selector"
#: Seconds the gateway's grace period keeps beyond preStop + drain + cleanup (gateway-deployment.yaml's sum).
SHUTDOWN_MARGIN_S = 5.0
#: The pod (and namespace) label the gateway's NetworkPolicy lets call its gRPC port.
CLIENT_LABEL = "quickdraw-client"
#: The optional components a platform team opts into (deploy/README.md, "Optional components").
OPTIONAL_COMPONENTS = ["tls", "cert-manager", "gateway-api", "prometheus-operator"]
#: Where the runbooks are served (docs/runbooks.md on the documentation site); every alert's runbook_url is this
#: plus "#" and the alert's name in lower case.
RUNBOOK_BASE = "https://quickdraw.example.com/runbooks/"
#: The init container that seeds the model volume (deploy/k8s/components/model-loader).
MODEL_LOADER = "model-loader"


# --- helpers ---------------------------------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kustomize_command() -> list[str] | None:
    """Standalone kustomize if present, else kubectl's built-in kustomize; None when neither is installed."""
    if exe := shutil.which("kustomize"):
        return [exe, "build"]
    if exe := shutil.which("kubectl"):
        return [exe, "kustomize"]
    return None


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(target: str) -> list[dict[str, Any]]:
    """The objects ``kustomize build deploy/k8s/<target>`` produces (cached per target; "../x" is deploy/x)."""
    if target not in _rendered:
        _rendered[target] = render_dir(K8S / target)
    return _rendered[target]


def render_dir(path: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build <path>`` produces (not cached)."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl (which embeds kustomize) is on PATH")
    out = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize build {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for o in objs:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def container(deploy: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def prestop_sleep_s(c: dict[str, Any]) -> float:
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep", cmd
    return float(cmd[1])


def settings_of(named: dict[str, str], tmp_path: Path) -> Settings:
    """The gateway's Settings from a manifest's QUICKDRAW_* values ($(POD_NAMESPACE) expanded as the kubelet does).
    The token file lives in a Secret mounted at run time: here a file with a fresh token stands in for it."""
    values = {k: v.replace("$(POD_NAMESPACE)", "quickdraw") for k, v in named.items()}
    if "auth_token_file" in values:
        stand_in = tmp_path / "tokens"
        stand_in.write_text(secrets.token_hex(32) + "\n")
        values["auth_token_file"] = str(stand_in)
    return Settings(**values)


def adapter_rules() -> list[tuple[str, dict[str, Any]]]:
    """(kind, rule) for every prometheus-adapter rule: kind is "pods" (rules) or "external" (externalRules)."""
    cfg = load_yaml(PROM / "adapter" / "config.yaml")
    return [("pods", r) for r in cfg.get("rules", [])] + [("external", r) for r in cfg.get("externalRules", [])]


def adapter_name(rule: dict[str, Any]) -> str:
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    return re.sub(rule["name"]["matches"], rule["name"].get("as", "$0").replace("$", "\\"), series)


def expand_adapter_query(kind: str, rule: dict[str, Any], namespace: str, pods: list[str]) -> str:
    """The PromQL prometheus-adapter sends for this rule: its metricsQuery with the templates filled."""
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)  # type: ignore[union-attr]
    if kind == "pods":
        matchers, group_by = f'namespace="{namespace}",pod=~"{"|".join(pods)}"', "pod"
    else:
        matchers, group_by = f'namespace="{namespace}"', "namespace"
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def rule_groups() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, r) for p in sorted((PROM / "rules").glob("*.yml")) for g in load_yaml(p)["groups"] for r in g["rules"]]


def recording_rules() -> list[dict[str, Any]]:
    return [r for _, r in rule_groups() if "record" in r]


def gateway_recording_rules() -> list[dict[str, Any]]:
    """The recording rules over the gateway's own series (TF Serving's have a live test of their own)."""
    return [r for r in recording_rules() if ":tensorflow:" not in r["expr"]]


def gateway_series_names() -> set[str]:
    """Every sample name the gateway's registry can expose (histogram parts, counter totals, gauges)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}{s}" for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        else:
            names.add(family.name)
    return names


def promql_names(expr: str) -> set[str]:
    """The plain quickdraw_* metric names in a PromQL expression (not recording-rule names with colons)."""
    return set(re.findall(r"(?<![\w:])quickdraw_\w+(?![\w:])", expr))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- kustomize: files, schemas, consistency ----------------------------------------------------------------------


def kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def test_every_path_a_kustomization_names_exists() -> None:
    assert kustomizations(), "no kustomization.yaml under deploy/"
    missing = []
    for k in kustomizations():
        doc, d = load_yaml(k), k.parent
        for res in doc.get("resources", []) + doc.get("components", []):
            p = d / res
            if not (p.is_file() or (p.is_dir() and (p / "kustomization.yaml").is_file())):
                missing.append(f"{k.relative_to(ROOT)}: resource {res}")
        for patch in doc.get("patches", []) + [{"path": p} for p in doc.get("patchesStrategicMerge", [])]:
            if "path" in patch and not (d / patch["path"]).is_file():
                missing.append(f"{k.relative_to(ROOT)}: patch {patch['path']}")
        for gen in doc.get("configMapGenerator", []) + doc.get("secretGenerator", []):
            for f in gen.get("files", []):
                if not (d / f.split("=", 1)[-1]).is_file():
                    missing.append(f"{k.relative_to(ROOT)}: generator {gen['name']} file {f}")
    assert not missing, "\n".join(missing)
    # base and both overlays are reachable from the overlays (nothing orphaned in deploy/k8s)
    for target in TARGETS:
        assert (K8S / target / "kustomization.yaml").is_file(), target


@pytest.mark.parametrize("target", [*TARGETS, "../loadtest", TRAINER])
def test_manifests_validate_against_kubernetes_schemas(target: str) -> None:
    import kubernetes_validate

    objs = render(target)
    errors = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: no schema ({e})")
    assert not errors, f"{target} (Kubernetes {K8S_VERSION}):\n" + "\n".join(errors)
    kinds = {o["kind"] for o in objs}
    if target == "../loadtest":
        assert kinds == {"Job"}, kinds
        return
    if target == TRAINER:
        assert kinds == {"Job", "PersistentVolumeClaim"}, kinds
        return
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap"} <= kinds, kinds  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_references_resolve(target: str) -> None:
    """ConfigMaps, PVCs, service accounts, HPA targets and selectors point at objects that exist."""
    objs = render(target)
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for o in objs:
        assert o["metadata"].get("namespace", "quickdraw") == "quickdraw" or o["kind"] == "Namespace"
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, v
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, v
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments]
    for o in objs:
        if o["kind"] == "HorizontalPodAutoscaler":
            ref = o["spec"]["scaleTargetRef"]
            assert (ref["kind"], ref["name"]) in names, ref
        selector = None
        if o["kind"] == "Service":
            selector = o["spec"]["selector"]
        elif o["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = o["spec"].get("selector", o["spec"].get("podSelector", {})).get("matchLabels")
        if selector is not None:
            assert any(selector.items() <= labels.items() for labels in pod_labels), (o["kind"], selector)


def test_tfserving_deployment() -> None:
    """Headless Service, ConfigMap files mounted where the args read them, readiness on the model, preStop."""
    base, gpu, cpu = (render(t) for t in TARGETS)
    svc = find(base, "Service", "tfserving-headless")
    assert svc["spec"]["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 8500, "http": 8501}
    for objs in (base, gpu, cpu):
        dep = find(objs, "Deployment", "tfserving")
        c = container(dep, "tfserving")
        args = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in c["args"]}
        assert args["--port"] == "8500" and args["--rest_api_port"] == "8501"
        cm = find(objs, "ConfigMap", next(v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"]
                                          if "configMap" in v))  # fmt: skip
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
        for flag in ("--model_config_file", "--batching_parameters_file", "--monitoring_config_file"):
            path = Path(args[flag])
            assert str(path.parent) == mount and path.name in cm["data"], (flag, path, sorted(cm["data"]))
            assert cm["data"][path.name] == (DEPLOY / "tfserving" / path.name).read_text()
        assert "grpc.max_connection_age_ms" in args["--grpc_channel_arguments"]
        probe = c["readinessProbe"]["httpGet"]
        assert probe["path"] == "/v1/models/quickdraw/metadata" and probe["port"] == "http"
        # TF Serving ignores SIGTERM: the preStop sleep must outlast a connection's max age plus its grace,
        # and the grace period must outlast the preStop sleep.
        age = dict(kv.split("=") for kv in args["--grpc_channel_arguments"].split(","))
        age_s = (int(age["grpc.max_connection_age_ms"]) + int(age.get("grpc.max_connection_age_grace_ms", 0))) / 1e3
        sleep = prestop_sleep_s(c)
        assert sleep >= age_s, (sleep, age_s)
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > sleep
        models = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "models")
        assert 'base_path: "' + models + '/quickdraw"' in cm["data"]["models.config"]
    gpu_tfs = find(gpu, "Deployment", "tfserving")
    spec = gpu_tfs["spec"]["template"]["spec"]
    c = container(gpu_tfs, "tfserving")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].startswith("tensorflow/serving:") and c["image"].endswith("-gpu")
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])  # scheduled by its limit, not labels
    assert any("persistentVolumeClaim" in v for v in spec["volumes"])
    cpu_tfs = find(cpu, "Deployment", "tfserving")
    assert "nvidia.com/gpu" not in json.dumps(cpu_tfs)
    assert not any(o["kind"] == "PersistentVolumeClaim" for o in cpu)
    init = cpu_tfs["spec"]["template"]["spec"]["initContainers"][0]
    assert init["image"] == container(find(cpu, "Deployment", "quickdraw-gateway"), "gateway")["image"]


def test_gateway_deployment_matches_its_settings(tmp_path: Path) -> None:
    """Env names are real settings, ports and probes match them, the grace period covers the drain."""
    fields = set(Settings.model_fields)
    for target in TARGETS:
        objs = render(target)
        dep = find(objs, "Deployment", "quickdraw-gateway")
        spec = dep["spec"]["template"]["spec"]
        c = container(dep, "gateway")
        env = env_of(c)
        named = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        not_settings = sorted(set(named) - fields)
        assert not not_settings, f"QUICKDRAW_* variables that are no setting: {not_settings}"
        # the values are valid settings too ($(POD_NAMESPACE) is expanded by the kubelet)
        settings = settings_of(named, tmp_path)
        assert settings.backend == "tfserving" and settings.max_connection_age_s > 0
        assert env["QUICKDRAW_BACKEND"] == "tfserving"
        assert env["QUICKDRAW_TFSERVING_TARGET"].startswith("dns:///tfserving-headless.")
        assert env["QUICKDRAW_TFSERVING_TARGET"].endswith(":8500")
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == settings.grpc_port and ports["metrics"] == settings.http_port
        assert not settings.http_api, "the metrics port is Prometheus-only: no JSON API or playground on it"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert any(str(settings.model_dir).startswith(m) for m in mounts) or target == "overlays/cpu", mounts
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ports["grpc"], probe
        from service.app import LIVENESS_SERVICE

        assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE  # not readiness: see the manifest
        assert "service" not in c["readinessProbe"]["grpc"]
        sc, psc = c["securityContext"], spec["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
        svc = find(objs, "Service", "quickdraw-gateway")
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["grpc"]
        pdb = find(objs, "PodDisruptionBudget", "quickdraw-gateway")
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_network_policies() -> None:
    """Only the gateway reaches TF Serving's gRPC port; only Prometheus reaches the metrics ports."""
    objs = render("base")
    gw_labels = find(objs, "Deployment", "quickdraw-gateway")["spec"]["template"]["metadata"]["labels"]
    tfs = find(objs, "NetworkPolicy", "tfserving")
    grpc_rule = next(r for r in tfs["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"]))
    assert [f["podSelector"]["matchLabels"].items() <= gw_labels.items() for f in grpc_rule["from"]] == [True]
    gw = find(objs, "NetworkPolicy", "quickdraw-gateway")
    for policy, port in ((tfs, "http"), (gw, "metrics")):
        rule = next(r for r in policy["spec"]["ingress"] if any(p["port"] == port for p in r["ports"]))
        [peer] = rule["from"]
        assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
        assert "namespaceSelector" in peer
    assert all("from" in r for r in gw["spec"]["ingress"]), "no port is open to every pod in the cluster"
    grpc_rule = next(r for r in gw["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"]))
    for peer in grpc_rule["from"]:  # named callers: pods (and, across namespaces, namespaces) with the label
        assert peer["podSelector"]["matchLabels"] == {CLIENT_LABEL: "true"}, peer
        assert peer.get("namespaceSelector", {"matchLabels": {CLIENT_LABEL: "true"}}) == {
            "matchLabels": {CLIENT_LABEL: "true"}}, peer
    [job] = [o for o in render("../loadtest") if o["kind"] == "Job"]
    assert job["spec"]["template"]["metadata"]["labels"][CLIENT_LABEL] == "true", "the load test may call"


def test_hpas_read_metrics_the_adapter_serves() -> None:
    """Pods and External metrics are ones prometheus-adapter serves; Resource metrics come from metrics-server."""
    served = {(kind, adapter_name(r)) for kind, r in adapter_rules()}
    for target in TARGETS:
        for hpa in (o for o in render(target) if o["kind"] == "HorizontalPodAutoscaler"):
            assert hpa["apiVersion"] == "autoscaling/v2"
            for m in hpa["spec"]["metrics"]:
                kind = m["type"].lower()
                if kind == "resource":
                    assert m[kind]["name"] in ("cpu", "memory"), m
                else:
                    assert (kind, m[kind]["metric"]["name"]) in served, (hpa["metadata"]["name"], m, served)
                assert m[kind]["target"]["type"] == "AverageValue"


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity ("700m", "1", "1.5") in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


#: Gateway metrics that rise when TF Serving is slow (calls wait on it): the gateway must not scale on them.
BACKEND_BOUND_METRICS = {"quickdraw_inflight_requests", "quickdraw_queue_depth_drawings",
                         "quickdraw_tfserving_outstanding_batches", "quickdraw_inflight_batches"}  # fmt: skip


def test_gateway_hpa_scales_on_its_own_cpu_and_tfserving_on_its_queueing() -> None:
    """Fix 6: the gateway's HPA reads the gateway's own CPU (below one core, where its event loop saturates), not
    calls in flight, which a slow TF Serving inflates; TF Serving's reads outstanding batches against
    num_batch_threads, the batches a replica runs at once."""
    threads = re.search(
        r"num_batch_threads\s*\{\s*value:\s*(\d+)", (DEPLOY / "tfserving" / "batching.config").read_text()
    )
    assert threads, "num_batch_threads missing from batching.config"
    for target in TARGETS:
        objs = render(target)
        gw = find(objs, "HorizontalPodAutoscaler", "quickdraw-gateway")
        [metric] = gw["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "quickdraw_gateway_cpu_cores", metric
        assert 0 < cpu_cores(metric["pods"]["target"]["averageValue"]) < 1.0, metric
        names = {m[m["type"].lower()].get("metric", {}).get("name") for m in gw["spec"]["metrics"]}
        assert not names & BACKEND_BOUND_METRICS, names
        tfs = find(objs, "HorizontalPodAutoscaler", "tfserving")
        [metric] = tfs["spec"]["metrics"]
        assert metric["type"] == "External", metric
        assert metric["external"]["metric"]["name"] == "quickdraw_tfserving_outstanding_batches"
        assert float(metric["external"]["target"]["averageValue"]) == int(threads.group(1))


def test_gateways_in_flight_batches_let_the_tfserving_hpa_reach_its_maximum() -> None:
    """The TF Serving HPA reads the gateways' outstanding batches (quickdraw_inflight_batches) against a target
    per replica; each gateway holds at most QUICKDRAW_MAX_CONCURRENT_BATCHES in flight. So the HPA's signal is
    capped at gateways x max_concurrent_batches: with the gateway HPA's minimum of gateways it must still be able
    to ask for TF Serving's maximum (else a fast GPU fleet would stop scaling at one replica per gateway, while
    the gateways, waiting cheaply, see no CPU to scale on)."""
    for target in TARGETS:
        objs = render(target)
        gw_hpa = find(objs, "HorizontalPodAutoscaler", "quickdraw-gateway")["spec"]
        tfs_hpa = find(objs, "HorizontalPodAutoscaler", "tfserving")["spec"]
        [metric] = tfs_hpa["metrics"]
        per_replica = float(metric["external"]["target"]["averageValue"])
        gw = find(objs, "Deployment", "quickdraw-gateway")
        [c] = [c for c in gw["spec"]["template"]["spec"]["containers"] if "QUICKDRAW_BACKEND" in env_of(c)]
        batches = int(env_of(c).get("QUICKDRAW_MAX_CONCURRENT_BATCHES", "1"))
        assert gw_hpa["minReplicas"] * batches >= tfs_hpa["maxReplicas"] * per_replica, (
            target, gw_hpa["minReplicas"], batches, tfs_hpa["maxReplicas"], per_replica)


def test_no_replicas_in_a_deployment_an_hpa_manages() -> None:
    """Fix 1: with spec.replicas set, every `kubectl apply` resets the count the HPA chose."""
    for target in TARGETS:
        objs = render(target)
        managed = [h["spec"]["scaleTargetRef"] for h in objs if h["kind"] == "HorizontalPodAutoscaler"]
        assert {(r["kind"], r["name"]) for r in managed} == {("Deployment", "quickdraw-gateway"),
                                                              ("Deployment", "tfserving")}  # fmt: skip
        for ref in managed:
            dep = find(objs, ref["kind"], ref["name"])
            assert "replicas" not in dep["spec"], f"{target}: {ref['name']} sets replicas under an HPA"


def pdb_disruptions_allowed(pdb: dict[str, Any], replicas: int) -> int:
    """Pods the PDB lets be evicted when ``replicas`` are expected and all healthy (the disruption controller's
    arithmetic: percentages of the expected count are rounded up)."""

    def count(v: int | str) -> int:
        return math.ceil(replicas * int(v[:-1]) / 100) if isinstance(v, str) and v.endswith("%") else int(v)

    spec = pdb["spec"]
    if "minAvailable" in spec:
        return max(0, replicas - count(spec["minAvailable"]))
    return min(replicas, count(spec["maxUnavailable"]))


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_tfserving_keeps_two_replicas_and_its_pdb_never_evicts_the_last(target: str) -> None:
    """Fix 2: on GPU at least 2 TF Serving replicas, and at every count the HPA may choose, voluntary evictions
    (node drains, upgrades) leave at least one running."""
    objs = render(target)
    hpa = find(objs, "HorizontalPodAutoscaler", "tfserving")
    low, high = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert low >= 2, f"{target}: TF Serving minReplicas {low}"
    pdb = find(objs, "PodDisruptionBudget", "tfserving")
    labels = find(objs, "Deployment", "tfserving")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for n in range(low, high + 1):
        left = n - pdb_disruptions_allowed(pdb, n)
        assert left >= 1, f"{target}: with {n} replicas the PDB lets all but {left} go"
    assert pdb_disruptions_allowed(pdb, high) <= 1, "GPU replicas start slowly: one eviction at a time"


def test_gateway_grace_period_is_prestop_plus_drain_plus_margin(tmp_path: Path) -> None:
    """Fix 3: terminationGracePeriodSeconds = preStop sleep + QUICKDRAW_SHUTDOWN_GRACE_S + CLEANUP_S + margin,
    rounded up, from the rendered env and preStop (gateway-deployment.yaml writes the same sum), and the drain
    outlasts the slowest call the gateway admits: decode budget + queue wait + QUICKDRAW_BACKEND_TIMEOUT_MS."""
    from service.app import CLEANUP_S

    for target in TARGETS:
        dep = find(render(target), "Deployment", "quickdraw-gateway")
        c = container(dep, "gateway")
        named = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in env_of(c).items() if k.startswith(ENV_PREFIX)}
        s = settings_of(named, tmp_path)
        assert {"shutdown_grace_s", "backend_timeout_ms"} <= set(named), "both set in the manifest, not defaulted"
        longest_call_s = (s.image_decode_budget_ms + s.max_queue_wait_ms + s.backend_timeout_ms) / 1000
        assert s.shutdown_grace_s >= longest_call_s, (s.shutdown_grace_s, longest_call_s)
        total = prestop_sleep_s(c) + s.shutdown_grace_s + CLEANUP_S + SHUTDOWN_MARGIN_S
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == math.ceil(total), (target, total)


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def model_mounts(spec: dict[str, Any]) -> tuple[dict[str, Any] | None, list[tuple[str, dict[str, Any]]]]:
    """The pod's volume on MODELS_CLAIM (None if it has none) and (container, mount) for every mount of it."""
    vol = next((v for v in spec.get("volumes", [])
                if v.get("persistentVolumeClaim", {}).get("claimName") == MODELS_CLAIM), None)  # fmt: skip
    if vol is None:
        return None, []
    cs = spec.get("initContainers", []) + spec["containers"]
    return vol, [(c["name"], m) for c in cs for m in c.get("volumeMounts", []) if m["name"] == vol["name"]]


def test_model_volume_is_read_only_for_servers_and_written_by_the_trainer() -> None:
    """Fix 4: TF Serving and the gateway mount the model claim read-only (pod volume and container mount), the
    gateway at the path that holds its QUICKDRAW_MODEL_DIR, which is TF Serving's base_path on the same volume;
    the opt-in trainer Job alone mounts it writable and exports there; the claim can be written at all."""
    for target in ("base", "overlays/gpu"):
        objs = render(target)
        pvc = find(objs, "PersistentVolumeClaim", MODELS_CLAIM)
        assert set(pvc["spec"]["accessModes"]) & {"ReadWriteMany", "ReadWriteOnce"}, "nobody could fill the volume"
        seen: dict[str, str] = {}  # deployment -> model directory relative to the volume
        for name, spec in pod_specs(objs):
            vol, mounts = model_mounts(spec)
            if vol is None:
                continue
            # The servers' containers mount it read-only. Only the model loader (an init container that seeds an
            # empty volume, before TF Serving starts) may write it, and the pod's volume is writable only for it.
            loader = [(c, m) for c, m in mounts if c == MODEL_LOADER]
            mounts = [(c, m) for c, m in mounts if c != MODEL_LOADER]
            assert vol["persistentVolumeClaim"].get("readOnly") is (not loader), (target, name, loader)
            assert not loader or name == "Deployment/tfserving", (target, name)
            assert mounts and all(m.get("readOnly") is True and "subPath" not in m for _, m in mounts), (name, mounts)
            [(cname, mount)] = mounts
            c = next(x for x in spec["containers"] if x["name"] == cname)
            if name == "Deployment/quickdraw-gateway":
                model_dir = env_of(c)["QUICKDRAW_MODEL_DIR"]
            else:
                cm = find(objs, "ConfigMap", next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v))
                model_dir = re.search(r'base_path:\s*"([^"]+)"', cm["data"]["models.config"]).group(1)  # type: ignore[union-attr]
            rel = Path(model_dir).relative_to(mount["mountPath"])
            seen[name] = str(rel)
        assert set(seen) == {"Deployment/quickdraw-gateway", "Deployment/tfserving"}, seen
        assert len(set(seen.values())) == 1, f"gateway and TF Serving read different directories: {seen}"

    from quickdraw.cli import build_parser

    gpu = render("overlays/gpu")
    [job] = [o for o in render(TRAINER) if o["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    vol, mounts = model_mounts(spec)
    assert vol is not None and "readOnly" not in vol["persistentVolumeClaim"]
    [(cname, mount)] = mounts
    assert not mount.get("readOnly"), mount
    c = next(x for x in spec["containers"] if x["name"] == cname)
    args = build_parser().parse_args(c["args"])
    assert args.command == "train"
    assert str(Path(args.out).relative_to(mount["mountPath"])) == seen["Deployment/tfserving"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    init = build_parser().parse_args(spec["initContainers"][0]["args"])
    assert init.command == "download" and str(args.data) == str(init.out)
    for o in render(TRAINER):  # the trainer's claims exist once the gpu overlay is applied, or come with it
        for v in o["spec"]["template"]["spec"]["volumes"] if o["kind"] == "Job" else []:
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert any(x["kind"] == "PersistentVolumeClaim" and x["metadata"]["name"] == claim
                           for x in gpu + render(TRAINER)), claim  # fmt: skip
    assert not any(o["kind"] == "Job" for o in gpu), "the trainer is opt-in, not part of the overlay"


#: Node labels that exist only where NVIDIA's GPU feature discovery (or node feature discovery) runs.
DISCOVERY_LABEL = re.compile(
    r"^(nvidia\.com/gpu\.|nvidia\.com/cuda\.|nvidia\.com/mig\.|feature\.node\.kubernetes\.io/)"
)


def discovery_labels(spec: dict[str, Any]) -> set[str]:
    """Node labels from GPU feature discovery that a pod spec requires (nodeSelector and required affinity)."""
    keys = set(spec.get("nodeSelector", {}))
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    for term in (required or {}).get("nodeSelectorTerms", []):
        keys |= {e["key"] for e in term.get("matchExpressions", [])}
    return {k for k in keys if DISCOVERY_LABEL.match(k)}


def test_no_node_selector_needs_gpu_feature_discovery(tmp_path: Path) -> None:
    """Fix 5: GPU pods are scheduled by their nvidia.com/gpu limit and tolerate the GPU taint; a selector on GPU
    feature discovery's labels appears only when the opt-in component is added."""
    for target in [*TARGETS, TRAINER]:
        for name, spec in pod_specs(render(target)):
            assert not discovery_labels(spec), (target, name, discovery_labels(spec))
            gpus = [c for c in spec["containers"] if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
            if gpus:
                assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule"
                           for t in spec.get("tolerations", [])), (target, name)  # fmt: skip
    # Opted in: the gpu overlay with the component, rendered from a kustomization beside it (kustomize wants
    # relative paths).
    top = tmp_path / "opt-in"
    top.mkdir()
    top.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", top)],
        "components": [os.path.relpath(GPU_NODE_SELECTOR, top)],
    }))  # fmt: skip
    opted = dict(pod_specs(render_dir(top)))
    assert discovery_labels(opted["Deployment/tfserving"]) == {"nvidia.com/gpu.present"}
    assert not discovery_labels(opted["Deployment/quickdraw-gateway"])


# --- day one: model loader, Secrets, images, optional components ------------------------------------------------

#: Kinds from CRDs (cert-manager, Gateway API, Prometheus operator): kubernetes-validate ships only the core API's
#: schemas, so these are checked by the tests below (references, names, generated content), not by a schema.
CRD_KINDS = {"Certificate": "cert-manager.io/v1", "Issuer": "cert-manager.io/v1",
             "Gateway": "gateway.networking.k8s.io/v1", "GRPCRoute": "gateway.networking.k8s.io/v1",
             "PodMonitor": "monitoring.coreos.com/v1", "PrometheusRule": "monitoring.coreos.com/v1"}  # fmt: skip


def render_with_components(overlay: str, components: list[str], tmp_path: Path) -> list[dict[str, Any]]:
    """An overlay with opt-in components added, as a platform team would add them (kustomize wants relative paths)."""
    top = tmp_path / f"with-{overlay.replace('/', '-')}"
    top.mkdir()
    top.joinpath("kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / overlay, top)],
        "components": [os.path.relpath(K8S / "components" / c, top) for c in components],
    }))  # fmt: skip
    return render_dir(top)


def secret_refs(spec: dict[str, Any]) -> set[str]:
    """Secrets a pod spec mounts or reads into its environment."""
    names = {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    for c in spec.get("initContainers", []) + spec["containers"]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
    return names


def documented_secrets() -> set[str]:
    """Secrets deploy/README.md tells the operator to create (`kubectl ... create secret KIND NAME`)."""
    return set(re.findall(r"create secret \w+ ([a-z0-9-]+)", (DEPLOY / "README.md").read_text()))


def check_secrets_and_loader(objs: list[dict[str, Any]], target: str) -> None:
    """Every Secret a pod needs is rendered, issued by a Certificate, or documented; TF Serving's pod seeds the
    model volume with the model loader and serves it read-only."""
    issued = {o["spec"]["secretName"] for o in objs if o["kind"] == "Certificate"}
    rendered = {o["metadata"]["name"] for o in objs if o["kind"] == "Secret"}
    for name, spec in pod_specs(objs):
        missing = secret_refs(spec) - issued - rendered - documented_secrets()
        assert not missing, f"{target} {name}: Secrets neither defined nor documented: {sorted(missing)}"
    gw = find(objs, "Deployment", "quickdraw-gateway")
    assert "quickdraw-gateway-auth" in secret_refs(gw["spec"]["template"]["spec"]), "the token Secret is mounted"
    env = env_of(container(gw, "gateway"))
    auth_mount = next(m for m in container(gw, "gateway")["volumeMounts"] if m["name"] == "auth")
    assert auth_mount["readOnly"] and Path(env["QUICKDRAW_AUTH_TOKEN_FILE"]).parent == Path(auth_mount["mountPath"])
    tfs = find(objs, "Deployment", "tfserving")
    spec = tfs["spec"]["template"]["spec"]
    [loader] = [c for c in spec.get("initContainers", []) if c["name"] == MODEL_LOADER]
    assert loader["image"] == container(gw, "gateway")["image"], "the loader copies from the gateway's own image"
    [target_mount] = [m for m in loader["volumeMounts"] if m["name"] == "models"]
    assert not target_mount.get("readOnly")
    serving = next(m for m in container(tfs, "tfserving")["volumeMounts"] if m["name"] == "models")
    assert serving["readOnly"] is True, "TF Serving mounts the model read-only"
    loader_env = env_of(loader)
    base_path = re.search(r'base_path:\s*"([^"]+)"', (DEPLOY / "tfserving" / "models.config").read_text()).group(1)  # type: ignore[union-attr]
    fills = Path(loader_env["MODEL_TARGET_DIR"]).relative_to(target_mount["mountPath"])
    assert fills == Path(base_path).relative_to(serving["mountPath"]), "the loader fills TF Serving's base_path"


@pytest.mark.parametrize("overlay", ["overlays/gpu", "overlays/cpu"])
def test_each_overlay_renders_with_its_secrets_model_loader_and_monitors(overlay: str, tmp_path: Path) -> None:
    """Each overlay as shipped, and with every optional component (tls, cert-manager, gateway-api,
    prometheus-operator): core objects validate against the Kubernetes schemas, CRD objects have their API
    version, Secrets are defined or documented, TF Serving's pod carries the model loader and mounts the model
    read-only, the monitors select the pods' metrics ports, the route reaches the gateway's gRPC port."""
    import kubernetes_validate

    check_secrets_and_loader(render(overlay), overlay)
    objs = render_with_components(overlay, OPTIONAL_COMPONENTS, tmp_path)
    errors = []
    for o in objs:
        if o["kind"] in CRD_KINDS:
            assert o["apiVersion"] == CRD_KINDS[o["kind"]], o["apiVersion"]
            assert o["metadata"]["namespace"] == "quickdraw", o["metadata"]
            continue
        try:
            kubernetes_validate.validate(o, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)
    assert {o["kind"] for o in objs} >= set(CRD_KINDS), sorted({o["kind"] for o in objs})
    check_secrets_and_loader(objs, f"{overlay} + components")
    # tls: the gateway serves the Secret's certificate; probes ask grpc.health.v1 over TLS with the same services
    gw = find(objs, "Deployment", "quickdraw-gateway")
    c = container(gw, "gateway")
    env = env_of(c)
    tls_mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert "quickdraw-gateway-tls" in secret_refs(gw["spec"]["template"]["spec"])
    for key in ("QUICKDRAW_TLS_CERT_FILE", "QUICKDRAW_TLS_KEY_FILE"):
        assert Path(env[key]).parent == Path(tls_mount["mountPath"]), key
    named = {k.removeprefix(ENV_PREFIX).lower() for k in env if k.startswith(ENV_PREFIX)}
    assert named <= set(Settings.model_fields), sorted(named - set(Settings.model_fields))
    from service.app import LIVENESS_SERVICE

    for probe, service in (("startupProbe", ""), ("readinessProbe", ""), ("livenessProbe", LIVENESS_SERVICE)):
        assert "grpc" not in c[probe], probe
        command = c[probe]["exec"]["command"]
        assert command[-1] == service and tls_mount["mountPath"] in command[2], probe
        compile(command[2], probe, "exec")  # the probe's Python parses
    cert = find(objs, "Certificate", "quickdraw-gateway-tls")
    assert "quickdraw-gateway.quickdraw.svc" in cert["spec"]["dnsNames"]
    # Prometheus operator: one PodMonitor per scrape job, on a port the selected pods have
    pods = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]: d
            for d in objs if d["kind"] == "Deployment"}  # fmt: skip
    monitors = [o for o in objs if o["kind"] == "PodMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"quickdraw-gateway", "tfserving"}
    for m in monitors:
        dep = pods[m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]]
        ports = {p["name"] for x in dep["spec"]["template"]["spec"]["containers"] for p in x.get("ports", [])}
        assert {e["port"] for e in m["spec"]["podMetricsEndpoints"]} <= ports, (m["metadata"]["name"], ports)
    [rule] = [o for o in objs if o["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == [g for p in sorted((PROM / "rules").glob("*.yml")) for g in load_yaml(p)["groups"]]
    # Gateway API: the route sends the gateway's services to its Service's gRPC port, and the policy lets the
    # proxies in
    route = find(objs, "GRPCRoute", "quickdraw-gateway")
    svc = find(objs, "Service", "quickdraw-gateway")
    for rule_ in route["spec"]["rules"]:
        for ref in rule_["backendRefs"]:
            assert ref["name"] == "quickdraw-gateway" and ref["port"] in [p["port"] for p in svc["spec"]["ports"]]
    services = {m["method"]["service"] for r in route["spec"]["rules"] for m in r["matches"]}
    from service.frontends.grpc.classifier import SERVICE_NAME

    assert SERVICE_NAME in services and "grpc.health.v1.Health" not in services
    policy = find(objs, "NetworkPolicy", "quickdraw-gateway")
    grpc_rule = next(r for r in policy["spec"]["ingress"] if any(p["port"] == "grpc" for p in r["ports"]))
    assert any("podSelector" not in peer for peer in grpc_rule["from"]), "the Gateway API proxies may call"


def test_tls_probes_ask_grpc_health_over_tls_of_a_real_gateway(tmp_path: Path) -> None:
    """The tls component's exec probes, run as written (paths and port pointed at a test gateway), answer from a
    real gateway serving TLS with a certificate for the names cert-manager's Certificate lists: exit 0 for startup,
    readiness and liveness; and they fail closed against a CA that did not sign the gateway's certificate."""
    import sys

    from test_security import _write_cert, _write_key, issue, make_ca

    if not find_versions(SHIPPED_MODEL):
        pytest.skip(f"no SavedModel under {SHIPPED_MODEL}")
    gw_dep = find(render_with_components("overlays/gpu", ["tls", "cert-manager"], tmp_path), "Deployment",
                  "quickdraw-gateway")  # fmt: skip
    c = container(gw_dep, "gateway")
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "tls")
    certificate = next(d for d in yaml.safe_load_all((K8S / "components" / "cert-manager" / "certificates.yaml")
                       .read_text()) if d["metadata"]["name"] == "quickdraw-gateway-tls")  # fmt: skip
    ca, rogue = make_ca("quickdraw-ca"), make_ca("rogue")
    key, cert = issue(ca, "quickdraw-gateway", server=True, names=tuple(certificate["spec"]["dnsNames"]))
    tls = tmp_path / "tls"
    tls.mkdir()
    _write_key(tls / "tls.key", key)
    _write_cert(tls / "tls.crt", cert)
    _write_cert(tls / "ca.crt", ca[1])
    env = env_of(c)
    assert env["QUICKDRAW_TLS_CERT_FILE"] == f"{mount}/tls.crt" and env["QUICKDRAW_TLS_KEY_FILE"] == f"{mount}/tls.key"
    with RunningGateway(tls_cert_file=tls / "tls.crt", tls_key_file=tls / "tls.key", warmup=False) as gw:

        def probe(name: str) -> subprocess.CompletedProcess[str]:
            cmd = c[name]["exec"]["command"]
            assert cmd[:2] == ["python", "-c"] and "127.0.0.1:50051" in cmd[2]
            code = cmd[2].replace(mount, str(tls)).replace("127.0.0.1:50051", gw.target)
            return subprocess.run([sys.executable, "-c", code, *cmd[3:]], capture_output=True, text=True, timeout=60)

        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            done = probe(name)
            assert done.returncode == 0, (name, done.stderr[-2000:])
        _write_cert(tls / "ca.crt", rogue[1])
        done = probe("readinessProbe")
        assert done.returncode != 0, "a certificate the CA did not sign must fail the probe"


def test_model_loader_seeds_an_empty_volume_atomically(tmp_path: Path) -> None:
    """The model loader's own script, run here with sh: it copies every version into an empty volume through a
    temporary directory and a rename, two loaders racing leave one complete copy and no temporary directory, and
    a volume that already holds a version (the trainer's) is left as it is."""
    if not shutil.which("sh"):
        pytest.skip("no sh to run the loader's script with")
    spec = find(render("overlays/gpu"), "Deployment", "tfserving")["spec"]["template"]["spec"]
    [loader] = [c for c in spec["initContainers"] if c["name"] == MODEL_LOADER]
    assert loader["command"] == ["/bin/sh", "-c"]
    script = loader["args"][0]
    # The kubelet expands $(NAME) in args and turns $$ into $: the script must not rely on either.
    assert "$(" not in script and "$$" not in script
    src = tmp_path / "image" / "quickdraw"
    for v in ("1", "2"):
        (src / v / "variables").mkdir(parents=True)
        (src / v / "saved_model.pb").write_bytes(os.urandom(4096))
        (src / v / "variables" / "variables.data-00000-of-00001").write_bytes(os.urandom(65536))
    (src / "README").write_text("not a version")

    def start(dst: Path, pod: str) -> subprocess.Popen[str]:
        env = {"PATH": os.environ["PATH"], "HOSTNAME": pod, "MODEL_SOURCE_DIR": str(src), "MODEL_TARGET_DIR": str(dst)}
        return subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    dst = tmp_path / "volume" / "quickdraw"
    racers = [start(dst, f"tfserving-{i}") for i in range(2)]
    outs = [(p.communicate(timeout=60)[0], p.returncode) for p in racers]
    assert all(rc == 0 for _, rc in outs), outs
    assert sorted(p.name for p in dst.iterdir()) == ["1", "2"], "every version, no temporary directory left"
    assert files(dst) == {k: v for k, v in files(src).items() if k != "README"}
    again = start(dst, "tfserving-2")
    assert again.communicate(timeout=60)[0].count("nothing to do") == 1 and again.returncode == 0
    trained = tmp_path / "trained" / "quickdraw"
    (trained / "7").mkdir(parents=True)
    p = start(trained, "tfserving-3")
    assert p.communicate(timeout=60)[0] and p.returncode == 0
    assert [x.name for x in trained.iterdir()] == ["7"], "a volume with a version is not seeded again"
    empty = tmp_path / "empty-image"
    empty.mkdir()
    src = empty
    p = start(tmp_path / "nothing" / "quickdraw", "tfserving-4")
    out = p.communicate(timeout=60)[0]
    assert p.returncode != 0 and "no version" in out, out


def test_images_and_storage_class_are_set_in_one_place() -> None:
    """The gateway and full images come from components/images alone (gpu overlay, load-test and trainer Jobs,
    TF Serving's model loader all run the same build); the model volume's storage class is set once, in the gpu
    overlay, and named in deploy/README.md."""
    component = load_yaml(K8S / "components" / "images" / "kustomization.yaml")
    wanted = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in component["images"]}
    for k in kustomizations():
        if k.parent != K8S / "components" / "images":
            named = {i["name"] for i in load_yaml(k).get("images", [])}
            assert not named & set(wanted), f"{k.relative_to(ROOT)} sets {named & set(wanted)}: only components/images"
    used = set()
    for target in ("overlays/gpu", "../loadtest", TRAINER):
        for _, spec in pod_specs(render(target)):
            for c in spec.get("initContainers", []) + spec["containers"]:
                if not c["image"].startswith("tensorflow/serving:"):
                    assert c["image"] in wanted.values(), (target, c["name"], c["image"])
                    used.add(c["image"])
    assert used == set(wanted.values())
    pvc = find(render("overlays/gpu"), "PersistentVolumeClaim", MODELS_CLAIM)
    cls = pvc["spec"]["storageClassName"]
    assert f"`{cls}`" in (DEPLOY / "README.md").read_text(), "deploy/README.md names the storage class to set"
    assert "storageClassName" not in json.dumps(render("base")), "the class is the overlay's one setting"


def test_prometheus_operator_component_is_generated_from_deploy_prometheus() -> None:
    """components/prometheus-operator/generated.yaml is what scripts/gen_prometheus_operator.py makes of
    deploy/prometheus now (not stale)."""
    import importlib.util

    path = ROOT / "scripts" / "gen_prometheus_operator.py"
    spec = importlib.util.spec_from_file_location("gen_prometheus_operator", path)
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.OUT.read_text() == gen.render(), "stale: run python scripts/gen_prometheus_operator.py"


# --- containers -------------------------------------------------------------------------------------------------


def dockerignore_allows(rel: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        rx = re.compile(
            "^" + re.escape(pat).replace(r"\*\*", "\0").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            .replace("\0/", "(.*/)?").replace("\0", ".*") + "$"
        )  # fmt: skip
        if any(rx.match(c) for c in candidates):
            allowed = neg
    return allowed


def dockerfile_copies(path: Path) -> list[str]:
    """Sources of every COPY/ADD from the build context (stage copies with --from= are not from it)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if any(w.startswith("--from=") for w in words[1:]):
            continue
        out += args[:-1]
    return out


#: ``pip install .`` or ``pip install ".[EXTRAS]"``: the group is the extras (None: the base install).
#: ``pip install [./clients/python] .[EXTRAS]``: the project (with the client distribution it depends on).
PIP_INSTALL_PROJECT = re.compile(r"""pip install (?:\./clients/python\s+)?["']?\.(?:\[([^\]]*)\])?["']?(?:\s|$)""")


def git_files() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.split() if out.returncode == 0 else []


@pytest.mark.parametrize("dockerfile", sorted((DEPLOY / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_every_path_a_dockerfile_copies_exists(dockerfile: Path) -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]  # fmt: skip
    tracked = git_files()
    sources = dockerfile_copies(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing"
    for src in sources:
        p = ROOT / src
        assert p.exists(), f"{dockerfile.name}: COPY {src}: no such path in the repository"
        assert dockerignore_allows(src, patterns), f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"
        if p.is_dir():
            inside = [f for f in tracked if f.startswith(src.rstrip("/") + "/")] if tracked else []
            let_in = [f for f in inside if dockerignore_allows(f, patterns)]
            assert let_in or not tracked, f"{dockerfile.name}: COPY {src}: .dockerignore lets no file of it in"
    text = dockerfile.read_text()
    if PIP_INSTALL_PROJECT.search(text):  # the image installs the project: every package pyproject.toml names is copied
        import tomllib

        include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
        packages = {p.rstrip("*") for p in include["include"]}
        copied = {src.strip("/") for src in sources}
        assert packages <= copied, f"{dockerfile.name} does not copy {sorted(packages - copied)}"
        assert {"pyproject.toml", "README.md"} <= copied
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", text, re.M), f"{dockerfile.name} must not run as root"


def test_the_gateway_image_is_the_slim_install_and_the_full_image_has_tensorflow() -> None:
    """gateway.Dockerfile installs no extra (no TensorFlow) and runs the tfserving backend, as the Kubernetes
    Deployment does; full.Dockerfile installs the tf extra for the embedded backend and the trainer."""
    gateway = (DEPLOY / "docker" / "gateway.Dockerfile").read_text()
    full = (DEPLOY / "docker" / "full.Dockerfile").read_text()
    assert [m.group(1) for m in PIP_INSTALL_PROJECT.finditer(gateway)] == [None], "the gateway image: no extras"
    assert "QUICKDRAW_BACKEND=tfserving" in gateway
    assert [m.group(1) for m in PIP_INSTALL_PROJECT.finditer(full)] == ["${EXTRAS}"]
    assert re.search(r"^ARG EXTRAS=tf$", full, re.M) and "QUICKDRAW_BACKEND=embedded" in full
    deployment = load_yaml(K8S / "base" / "gateway-deployment.yaml")
    [c] = deployment["spec"]["template"]["spec"]["containers"]
    assert c["image"].startswith("quickdraw-gateway:")
    assert {"name": "QUICKDRAW_BACKEND", "value": "tfserving"} in c["env"]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]  # fmt: skip
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/x.npy",
        "runs/qdnet/logs/e",
        "tests/test_deploy.py",
        "service/__pycache__/app.cpython-311.pyc",
        "models/quickdraw/1/evaluation/confusion.png",
    ):
        assert not dockerignore_allows(path, patterns), path
    for path in ("service/app.py", "pyproject.toml", "models/quickdraw/1/saved_model.pb"):
        assert dockerignore_allows(path, patterns), path


# --- Prometheus: promtool -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> Path:
    """The directory holding promtool and prometheus; installs Debian's prometheus package when missing."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("promtool/prometheus missing and cannot install Debian's prometheus (needs root and apt)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not shutil.which("promtool"):
            pytest.skip(f"could not install Debian's prometheus package: {done.stderr.strip()[-500:]}")
    return Path(shutil.which("promtool")).parent  # type: ignore[arg-type]


def promtool_run(promtool: Path, *args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run([str(promtool / "promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


#: The meta labels Kubernetes pod discovery gives a target (prometheus.io docs, kubernetes_sd_config role pod).
def pod_meta_labels(app: str, port_name: str, pod: str, namespace: str = "quickdraw") -> dict[str, str]:
    return {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_node_name": "node-1",
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
        "__meta_kubernetes_pod_container_port_name": port_name,
    }


KUBERNETES_SD_KEYS = {"role", "namespaces", "selectors", "api_server", "kubeconfig_file", "attach_metadata"}


def with_static_discovery(config: dict[str, Any], targets: dict[str, tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """The config with each job's kubernetes_sd_configs replaced by a static target carrying the same meta labels.

    Debian builds Prometheus without Kubernetes discovery (its NEWS.Debian: "Kubernetes support has been
    completely removed"), so its promtool and server refuse kubernetes_sd_configs. Everything else (relabelling,
    rule files, paths) is checked and run as written. Jobs not in ``targets`` are dropped.
    """
    out = copy.deepcopy(config)
    jobs = []
    for job in out["scrape_configs"]:
        sd = job.pop("kubernetes_sd_configs", None)
        if sd is not None:
            for s in sd:
                assert set(s) <= KUBERNETES_SD_KEYS and s["role"] == "pod", s
        if job["job_name"] in targets:
            address, labels = targets[job["job_name"]]
            job["static_configs"] = [{"targets": [address], "labels": labels}]
            jobs.append(job)
    out["scrape_configs"] = jobs
    return out


def test_promtool_check_config(promtool: Path, tmp_path: Path) -> None:
    config = load_yaml(PROM / "prometheus.yml")
    out = subprocess.run([str(promtool / "promtool"), "check", "config", str(PROM / "prometheus.yml")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    if out.returncode == 0:
        return
    assert "kubernetes_sd_configs" in out.stdout + out.stderr, out.stdout + out.stderr
    # A promtool without Kubernetes discovery (Debian's): check everything else, as written.
    targets = {j["job_name"]: ("127.0.0.1:9", pod_meta_labels("x", "metrics", "p")) for j in config["scrape_configs"]}
    checked = with_static_discovery(config, targets)
    checked["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(checked, sort_keys=False))
    promtool_run(promtool, "check", "config", str(path))


def test_promtool_check_rules(promtool: Path) -> None:
    files = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert files
    promtool_run(promtool, "check", "rules", *files)


def test_promtool_test_rules_covers_every_alert(promtool: Path) -> None:
    """Every test file under deploy/prometheus/tests passes (alerts.test.yml, and model-health.test.yml, which
    scripts/gen_drift_tests.py writes from the shipped model's answers), and every alert has a firing test."""
    files = sorted((PROM / "tests").glob("*.test.yml"))
    assert [f.name for f in files] == ["alerts.test.yml", "model-health.test.yml"]
    out = promtool_run(promtool, "test", "rules", *(f.name for f in files), cwd=files[0].parent)
    assert out.count("SUCCESS") == len(files), out
    alerts = {r["alert"] for _, r in rule_groups() if "alert" in r}
    cases = [case for f in files for case in load_yaml(f)["tests"]]
    tested = {t["alertname"] for case in cases for t in case.get("alert_rule_test", [])}
    firing = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested == firing, f"alerts without a firing test: {sorted(alerts - firing)}"
    needed = {"QuickdrawHighErrorRatio", "QuickdrawLatencySLOBreach", "QuickdrawQueueBacklog",
              "QuickdrawNoReadyTFServing"}  # fmt: skip
    assert needed <= alerts


# --- PromQL names and the dashboard -----------------------------------------------------------------------------


def test_promql_names_exist_in_the_gateway() -> None:
    """Every quickdraw_* series named in rules, adapter rules and the dashboard is one the gateway exposes."""
    exposed = gateway_series_names()
    exprs = [r.get("expr", "") for _, r in rule_groups()]
    exprs += [r["seriesQuery"] + " " + r["metricsQuery"] for _, r in adapter_rules()]
    dash = json.loads((DEPLOY / "grafana" / "quickdraw.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    unknown = {n for e in exprs for n in promql_names(e)} - exposed
    assert not unknown, f"not exposed by service/core/metrics.py: {sorted(unknown)}"


def test_dashboard_uses_the_recording_rules() -> None:
    dash = json.loads((DEPLOY / "grafana" / "quickdraw.json").read_text())
    recorded = {r["record"] for r in recording_rules()}
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {n for e in exprs for n in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", e)}
    assert used <= recorded, f"dashboard reads unrecorded series: {sorted(used - recorded)}"
    for q in ("p50", "p90", "p99"):
        assert f"job_method:quickdraw_request_duration_seconds:{q}_1m" in used
    assert {"job:quickdraw_requests:rate1m", "job:quickdraw_batch_size_drawings:mean1m",
            "job:quickdraw_request_errors:ratio_rate5m"} <= used  # fmt: skip
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_alerts_are_namespace_agnostic_and_link_their_runbooks() -> None:
    """No alert or recording rule names a namespace; every alert's runbook_url is its section of
    docs/runbooks.md (anchor: the alert's name in lower case), and every section there is an alert's."""
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    sections = set(re.findall(r"^## (\w+)\s*$", runbooks, flags=re.M))
    alerts = [r for _, r in rule_groups() if "alert" in r]
    for _, r in rule_groups():
        assert "namespace=" not in re.sub(r"\s", "", r["expr"]), r.get("alert", r.get("record"))
    for a in alerts:
        assert a["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}#{a['alert'].lower()}", a["alert"]
        section = runbooks.split(f"## {a['alert']}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Means:**", "**First checks:**", "**Mitigation:**"):
            assert part in section, (a["alert"], part)
    assert sections == {a["alert"] for a in alerts}
    [shedding] = [a for a in alerts if a["alert"] == "QuickdrawRejectingCalls"]
    assert shedding["labels"]["severity"] != "page" and "ratio" in shedding["expr"]


def test_dashboard_charts_the_autoscalers_inputs_and_tfserving() -> None:
    """The autoscaling row charts what the HPAs read (the gateway's CPU per pod, as prometheus-adapter computes
    quickdraw_gateway_cpu_cores; the outstanding batches of the TF Serving HPA), not calls in flight; TF Serving's
    own latency and batching, and DCGM's GPU utilisation, have panels."""
    dash = json.loads((DEPLOY / "grafana" / "quickdraw.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    recorded = {r["record"]: r["expr"] for r in recording_rules()}
    used = set(re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", exprs))
    cpu_series = {name for name in used if "process_cpu_seconds_total" in recorded.get(name, "")}
    [adapter_cpu] = [r for kind, r in adapter_rules() if adapter_name(r) == "quickdraw_gateway_cpu_cores"]
    assert cpu_series and "process_cpu_seconds_total" in adapter_cpu["seriesQuery"], cpu_series
    assert "job:quickdraw_inflight_batches:sum" in used  # the TF Serving HPA's input
    assert "job:quickdraw_inflight_requests:avg_per_pod" not in used, "no HPA reads calls in flight"
    tfs = {n for n in used if ":tensorflow:serving:" in recorded.get(n, "")}
    assert any("request_latency" in recorded[n] for n in tfs) and any("queuing_latency" in recorded[n] for n in tfs)
    assert any("wrapped_run_count" in recorded[n] for n in tfs)
    assert "DCGM_FI_DEV_GPU_UTIL" in exprs


# --- a real Prometheus scraping a real gateway ------------------------------------------------------------------


def query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.load(urllib.request.urlopen(url, timeout=10))
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    """The real gateway on free ports, serving the shipped model."""
    if not find_versions(SHIPPED_MODEL):
        pytest.skip(f"no SavedModel under {SHIPPED_MODEL}")
    with RunningGateway(max_batch_delay_ms=2.0) as gw:
        yield gw


def test_loadtest_job_runs_quickdraw_commands_that_parse() -> None:
    """The load-test Job's containers run `quickdraw download` and `quickdraw loadtest` with valid arguments."""
    from quickdraw.cli import build_parser

    [job] = [o for o in render("../loadtest") if o["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    gw_image = container(find(render("overlays/gpu"), "Deployment", "quickdraw-gateway"), "gateway")["image"]
    commands = []
    for c in spec["initContainers"] + spec["containers"]:
        assert c["image"] == gw_image and "command" not in c, c["name"]  # the image's ENTRYPOINT: quickdraw
        args = build_parser().parse_args(c["args"])
        commands.append(args.command)
    assert commands == ["download", "loadtest"]
    loadtest = build_parser().parse_args(spec["containers"][0]["args"])
    assert loadtest.target.split(".")[0] == "quickdraw-gateway" and str(loadtest.data[0]) == "/data"


@contextlib.contextmanager
def live_prometheus(promtool: Path, tmp: Path, job: str, target: tuple[str, dict[str, str]]) -> Iterator[str]:
    """A real Prometheus on a free port with deploy/prometheus' scrape config and rules, ``job`` pointed at
    ``target`` (address, pod meta labels) and 1 s intervals; yields its URL once it has scraped ``job``."""
    config = load_yaml(PROM / "prometheus.yml")
    live = with_static_discovery(config, {job: target})
    live["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    live["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(live, sort_keys=False))
    port = free_port()
    with (tmp / "prometheus.log").open("w") as log:
        server = subprocess.Popen(
            [str(promtool / "prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
                with contextlib.suppress(OSError):
                    if query(base, f'up{{job="{job}"}} == 1'):
                        break
                assert time.monotonic() < deadline, f"Prometheus never scraped {job}"
                time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def prometheus_on_gateway(
    promtool: Path, gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """(Prometheus URL, scraped pod name): the repo's scrape job and rules on a live gateway under load."""
    from service.client import QuickDrawClient

    tmp = tmp_path_factory.mktemp("prometheus")
    pod = "quickdraw-gateway-5d8f7c9b6-x2x7q"
    gw = gateway
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with QuickDrawClient(gw.target, timeout_s=30) as client:
            while not stop.is_set():
                n = int(rng.integers(1, 9))
                client.classify(list(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)), top_k=3)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    target = (f"127.0.0.1:{gw.app.http_port}", pod_meta_labels("quickdraw-gateway", "metrics", pod))
    try:
        with live_prometheus(promtool, tmp, "quickdraw-gateway", target) as base:
            yield base, pod
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


def wait_for(base: str, expr: str, timeout_s: float = 45) -> list[dict[str, Any]]:
    """The result of ``expr`` once it has a finite sample (rate windows need two scrapes; an idle series is NaN)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = query(base, expr)
        if any(math.isfinite(float(s["value"][1])) for s in result):
            return result
        assert time.monotonic() < deadline, f"no finite value for:\n{expr}\nlast result: {result}"
        time.sleep(0.5)


def test_prometheus_scrapes_the_gateway_with_kubernetes_labels(prometheus_on_gateway: tuple[str, str]) -> None:
    base, pod = prometheus_on_gateway
    [up] = wait_for(base, 'up{job="quickdraw-gateway"}')
    assert up["metric"]["namespace"] == "quickdraw" and up["metric"]["pod"] == pod, up["metric"]
    assert not any(k.startswith("__") for k in up["metric"] if k != "__name__"), up["metric"]


@pytest.mark.parametrize("index", range(len(adapter_rules())), ids=[adapter_name(r) for _, r in adapter_rules()])
def test_adapter_rule_promql_returns_a_value(prometheus_on_gateway: tuple[str, str], index: int) -> None:
    """The HPAs' PromQL, expanded as prometheus-adapter expands it, answers from the live gateway's data."""
    base, pod = prometheus_on_gateway
    kind, rule = adapter_rules()[index]
    series = wait_for(base, rule["seriesQuery"])
    assert series, rule["seriesQuery"]
    promql = expand_adapter_query(kind, rule, "quickdraw", [pod])
    result = wait_for(base, promql)
    if kind == "pods":
        assert [s["metric"]["pod"] for s in result] == [pod], result
    else:
        assert len(result) == 1, result
    if adapter_name(rule) == "quickdraw_inflight_requests":  # the gateway HPA's metric, under load
        deadline = time.monotonic() + 30
        while float(result[0]["value"][1]) <= 0:
            assert time.monotonic() < deadline, f"{promql} stayed 0 under load"
            time.sleep(1)
            result = wait_for(base, promql)


@pytest.mark.parametrize("index", range(len(gateway_recording_rules())),
                         ids=[r["record"] for r in gateway_recording_rules()])  # fmt: skip
def test_recording_rule_promql_returns_a_value(prometheus_on_gateway: tuple[str, str], index: int) -> None:
    """Each recording rule over the gateway's series answers with finite values, and Prometheus records it under
    its name (TF Serving's: test_tfserving_recording_rules_answer_from_tf_servings_metrics)."""
    base, _ = prometheus_on_gateway
    rule = gateway_recording_rules()[index]
    result = wait_for(base, rule["expr"])
    assert all(s["metric"].get("namespace") == "quickdraw" for s in result), result
    recorded = wait_for(base, rule["record"])
    assert recorded, rule["record"]


def test_tfserving_recording_rules_answer_from_tf_servings_metrics(promtool: Path, tmp_path: Path) -> None:
    """The dashboard's TF Serving rules, evaluated by a real Prometheus scraping the TF Serving stand-in
    (tests/tfserving_standin.py: TF Serving's metric names, units and exposition) through the tfserving scrape job
    and relabelling of deploy/prometheus/prometheus.yml, with deploy/tfserving's batching and monitoring config,
    while Predict calls arrive: each answers a finite value under its name, latencies in seconds."""
    from google.protobuf import text_format
    from tfserving_standin import TFServingStandIn

    from quickdraw.tfserving_schema import batching_parameters_pb2, monitoring_config_pb2
    from service.protos import tfs
    from service.protos.tensors import from_numpy

    if not find_versions(SHIPPED_MODEL):
        pytest.skip(f"no SavedModel under {SHIPPED_MODEL}")
    rules = [r for r in recording_rules() if ":tensorflow:" in r["expr"]]
    assert rules
    batching = text_format.Parse((DEPLOY / "tfserving" / "batching.config").read_text(),
                                 batching_parameters_pb2.BatchingParameters())  # fmt: skip
    monitoring = text_format.Parse((DEPLOY / "tfserving" / "monitoring.config").read_text(),
                                   monitoring_config_pb2.MonitoringConfig())  # fmt: skip
    rest = free_port()
    pod = "tfserving-7c9d8b6f5-abcde"
    target = (f"127.0.0.1:{rest}", pod_meta_labels("tfserving", "http", pod))
    stop = threading.Event()
    with TFServingStandIn(SHIPPED_MODEL, batching_parameters=batching, rest_api_port=rest,
                          monitoring_config=monitoring, enable_model_warmup=False) as standin:  # fmt: skip

        def load() -> None:
            import grpc

            with grpc.insecure_channel(standin.target) as ch:
                stub = tfs.PredictionServiceStub(ch)
                rows = np.zeros((4, 28, 28, 1), np.uint8)
                while not stop.is_set():
                    req = tfs.PredictRequest(output_filter=["probabilities"])
                    req.model_spec.name = "quickdraw"
                    req.inputs["image"].CopyFrom(from_numpy(rows))
                    stub.Predict(req, timeout=10)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            with live_prometheus(promtool, tmp_path, "tfserving", target) as base:
                for rule in rules:
                    [sample] = wait_for(base, rule["expr"])
                    value = float(sample["value"][1])
                    assert sample["metric"]["namespace"] == "quickdraw" and value > 0, (rule["record"], sample)
                    if "seconds" in rule["record"]:
                        assert value < 10, (rule["record"], value, "microseconds not converted")
                    assert wait_for(base, rule["record"]), rule["record"]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
