"""Kubernetes manifests: schema-valid (strict, kubernetes-validate), one GPU per pod, probes on the two
health endpoints, a grace period that covers preStop + drain, weights from a read-only PVC, and an HPA on
cascade_queue_depth that the Prometheus adapter rule actually provides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.tooling import REPO

K8S = REPO / "deploy" / "k8s"
DOCS = REPO / "docs" / "deploy.md"


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_all() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind (these manifests have one of each)."""
    resources: dict[str, dict[str, Any]] = {}
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in resources, f"second {doc['kind']} in {path.name}"
            resources[doc["kind"]] = doc
    return resources


@pytest.fixture(scope="module")
def res() -> dict[str, dict[str, Any]]:
    return load_all()


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{path.name} ({doc.get('kind')}) is invalid for Kubernetes {version}: {exc}"
            )


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


def container(res: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (c,) = res["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c["env"]}


def test_one_gpu_per_pod_and_probes_on_the_health_endpoints(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert res["Deployment"]["spec"]["template"]["spec"].get("containers") == [c], (
        "one server per pod"
    )
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live", (
        "liveness must not fire during a long load"
    )
    port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] in port_names
    assert port_names["http"] == int(env_of(c)["CASCADE_PORT"])
    assert env_of(c)["CASCADE_HOST"] == "0.0.0.0"


def test_grace_period_covers_prestop_and_drain(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    pod = res["Deployment"]["spec"]["template"]["spec"]
    drain = float(env_of(c)["CASCADE_DRAIN_TIMEOUT_S"])
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", (
        "preStop waits for endpoint removal before SIGTERM starts the drain"
    )
    pre_stop = float(command[1])
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 5, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + drain {drain} + 5 s to exit"
    )
    assert grace <= pre_stop + drain + 30, "a much longer grace period only delays rollouts"


def test_weights_from_a_read_only_pvc_and_non_root(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    pod = res["Deployment"]["spec"]["template"]["spec"]
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[env_of(c)["CASCADE_WEIGHTS_DIR"]]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = res["PersistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]

    dockerfile_uid = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_uid is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_uid.group(1))


def test_service_selects_the_pods(res: dict[str, dict[str, Any]]) -> None:
    labels = res["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = res["Service"]["spec"]
    assert svc["selector"].items() <= labels.items()
    assert svc["ports"][0]["targetPort"] in {p["name"] for p in container(res)["ports"]}
    assert res["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def adapter_rule(res: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    config = yaml.safe_load(res["ConfigMap"]["data"]["config.yaml"])
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == metric]
    return rule


def test_hpa_scales_on_queue_depth_served_by_the_adapter(res: dict[str, dict[str, Any]]) -> None:
    hpa = res["HorizontalPodAutoscaler"]["spec"]
    deployment = res["Deployment"]["metadata"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["name"],
    }
    assert res["HorizontalPodAutoscaler"]["metadata"]["namespace"] == deployment["namespace"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "cascade_queue_depth"
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]

    rule = adapter_rule(res, "cascade_queue_depth")
    assert rule["seriesQuery"].startswith("cascade_queue_depth{")
    assert re.fullmatch(rule["name"]["matches"], "cascade_queue_depth")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    annotations = res["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"


def test_docs_explain_every_manifest() -> None:
    text = DOCS.read_text()
    for path in [*manifest_files(), K8S / "kustomization.yaml"]:
        assert path.name in text, f"docs/deploy.md does not mention deploy/k8s/{path.name}"
    for topic in (
        "cascade_queue_depth",
        "terminationGracePeriodSeconds",
        "preStop",
        "CASCADE_DRAIN_TIMEOUT_S",
        "prometheus-adapter",
        "ReadOnlyMany",
        "nvidia.com/gpu",
    ):
        assert topic in text, f"docs/deploy.md does not explain {topic}"
