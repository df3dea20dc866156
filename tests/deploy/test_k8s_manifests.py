"""Kubernetes manifests: schema-valid (strict, kubernetes-validate), a default kustomization that applies
on a bare cluster (every namespace it uses, it creates; `kubectl kustomize` builds it), one GPU per pod,
probes on the two health endpoints, a grace period that covers preStop + drain, API keys from a mounted
Secret, weights filled by a Job from Hugging Face and read through a read-only mount, and an HPA on
cascade_queue_depth that the (optional) Prometheus adapter rule actually provides."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.processes import ManagedProcess, wait_until
from tests.deploy.tooling import REPO, find_tool

K8S = REPO / "deploy" / "k8s"
ADAPTER = K8S / "prometheus-adapter"
DOCS = REPO / "docs" / "deploy.md"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


def manifests_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def manifest_files() -> list[Path]:
    return manifests_in(K8S) + manifests_in(ADAPTER)


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


@pytest.mark.parametrize("directory", [K8S, ADAPTER], ids=["default", "prometheus-adapter"])
def test_kustomization_lists_every_manifest(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifests_in(directory))


def namespaces_used(docs: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """(namespaces the objects live in, namespaces the objects create)."""
    used = {d["metadata"]["namespace"] for d in docs if d["kind"] not in CLUSTER_SCOPED}
    created = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    return used, created


def test_default_kustomization_creates_every_namespace_it_uses() -> None:
    """`kubectl apply -k deploy/k8s` must work on a cluster that has only the default namespaces: no
    object may live in a namespace (like the adapter's `monitoring`) that the kustomization does not
    create."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = [
        doc
        for name in kustomization["resources"]
        for doc in yaml.safe_load_all((K8S / name).read_text())
    ]
    used, created = namespaces_used(docs)
    assert used <= created, (
        f"objects in namespaces the kustomization does not create: {used - created}"
    )
    assert all(d["kind"] != "ConfigMap" or "adapter" not in d["metadata"]["name"] for d in docs)


def test_kubectl_builds_both_kustomizations() -> None:
    kubectl = find_tool("kubectl")

    def build(directory: Path) -> list[dict[str, Any]]:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
        return [d for d in yaml.safe_load_all(result.stdout) if d]

    default = build(K8S)
    assert {d["kind"] for d in default} >= {
        "Namespace",
        "Deployment",
        "Job",
        "HorizontalPodAutoscaler",
    }
    used, created = namespaces_used(default)
    assert used == created == {"cascade"}, (used, created)
    (adapter,) = build(ADAPTER)
    assert adapter["kind"] == "ConfigMap" and adapter["metadata"]["namespace"] == "monitoring"


def pod_spec(res: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    return res[kind]["spec"]["template"]["spec"]


def container(res: dict[str, dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    (c,) = pod_spec(res, kind)["containers"]
    return c


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """Plain values only (entries from a Secret are read with secret_env)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def secret_env(c: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}


def volume_of(pod: dict[str, Any], mount: dict[str, Any]) -> dict[str, Any]:
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


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


def test_weights_read_only_for_the_server_and_non_root(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    pod = pod_spec(res, "Deployment")
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[env_of(c)["CASCADE_WEIGHTS_DIR"]]
    assert mount["readOnly"] is True
    claim = volume_of(pod, mount)["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    pvc = res["PersistentVolumeClaim"]
    assert claim["claimName"] == pvc["metadata"]["name"]
    # Written by the Job on one node, read by pods on any node.
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    dockerfile_uid = re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert dockerfile_uid is not None
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dockerfile_uid.group(1))


def test_api_keys_come_from_a_mounted_secret(res: dict[str, dict[str, Any]]) -> None:
    c = container(res)
    keys_file = Path(env_of(c)["CASCADE_API_KEYS_FILE"])
    assert "CASCADE_API_KEYS" not in env_of(c) and not secret_env(c), "keys belong in the file"
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[str(keys_file.parent)]
    assert mount["readOnly"] is True
    secret = volume_of(pod_spec(res, "Deployment"), mount)["secret"]
    assert secret["secretName"] == "cascade-api-keys"
    assert secret.get("optional", False) is False, "a pod must not start without its keys"
    (item,) = secret["items"]
    assert item["path"] == keys_file.name
    # Group-readable at most (the server runs as uid/gid 10001 with fsGroup 10001), never by others.
    assert secret["defaultMode"] & 0o007 == 0 and secret["defaultMode"] & 0o040
    assert pod_spec(res, "Deployment")["securityContext"]["fsGroup"] == 10001


def test_the_weights_job_downloads_with_the_token_into_the_servers_volume(
    res: dict[str, dict[str, Any]],
) -> None:
    job, deployment = res["Job"], res["Deployment"]
    assert job["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    c = container(res, "Job")
    assert secret_env(c)["HF_TOKEN"] == {"name": "hf-token", "key": "token"}
    env = env_of(c)
    assert env["HF_HUB_OFFLINE"] == "0", "the image is offline by default; the Job must not be"
    assert c["image"] == container(res)["image"], "one image to build, push and set"
    server_env = env_of(container(res))
    for variant in ("CASCADE_PRIOR_VARIANT", "CASCADE_DECODER_VARIANT"):
        assert env[variant] == server_env[variant], f"the Job downloads another {variant}"
    mount = {m["mountPath"]: m for m in c["volumeMounts"]}[env["CASCADE_WEIGHTS_DIR"]]
    assert not mount.get("readOnly", False)
    claim = volume_of(pod_spec(res, "Job"), mount)["persistentVolumeClaim"]
    assert claim["claimName"] == res["PersistentVolumeClaim"]["metadata"]["name"]
    assert not claim.get("readOnly", False)
    assert pod_spec(res, "Job")["securityContext"]["runAsUser"] == 10001


def wait_for_weights(res: dict[str, dict[str, Any]]) -> tuple[list[str], str]:
    """The server pods' init container: (its command, the marker file it waits for)."""
    (init,) = pod_spec(res, "Deployment")["initContainers"]
    assert init["image"] == container(res)["image"]
    assert all(m.get("readOnly") for m in init["volumeMounts"])
    return init["command"], env_of(init)["WEIGHTS_MARKER"]


def test_the_job_script_downloads_the_servers_variants_then_writes_the_marker(
    res: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Run the Job's own script with a stand-in huggingface_hub that records the call."""
    c = container(res, "Job")
    assert c["command"] == ["python", "-c"]
    (script,) = c["args"]
    stub = tmp_path / "stub" / "huggingface_hub"
    stub.mkdir(parents=True)
    calls = tmp_path / "calls.txt"
    (stub / "__init__.py").write_text(
        "def snapshot_download(repo_id, *, local_dir, allow_patterns):\n"
        f"    open({str(calls)!r}, 'a').write(repr((repo_id, str(local_dir), allow_patterns)) + '\\n')\n"
    )
    weights = tmp_path / "weights"
    weights.mkdir()
    _, marker = wait_for_weights(res)
    job_dir = env_of(c)["CASCADE_WEIGHTS_DIR"]
    assert marker.startswith(job_dir + "/"), (
        "the init container waits for a file the Job never writes"
    )

    def run(**overrides: str) -> subprocess.CompletedProcess[str]:
        env = {**env_of(c), "HF_TOKEN": "hf_test", "CASCADE_WEIGHTS_DIR": str(weights)}
        env.update(overrides, PYTHONPATH=str(stub.parent), PATH="/usr/bin:/bin")
        return subprocess.run(
            [sys.executable, "-c", script],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    refused = run(CASCADE_PRIOR_VARIANT="huge")
    assert refused.returncode != 0 and "CASCADE_PRIOR_VARIANT='huge'" in refused.stderr
    assert "HF_TOKEN is empty" in run(HF_TOKEN="").stderr
    assert not calls.exists(), "nothing is downloaded after a refusal"

    done = run()
    assert done.returncode == 0, done.stderr
    ((repo, local_dir, patterns),) = [
        ast.literal_eval(line) for line in calls.read_text().splitlines()
    ]
    assert repo == "stabilityai/stable-cascade" and local_dir == str(weights)
    variants = (env_of(c)["CASCADE_PRIOR_VARIANT"], env_of(c)["CASCADE_DECODER_VARIANT"])
    assert variants == ("lite", "lite")
    assert patterns == [
        "stage_c_lite_bf16.safetensors",
        "stage_b_lite_bf16.safetensors",
        "stage_a.safetensors",
        "text_encoder/*",
        "tokenizer/*",
    ]
    assert (weights / marker[len(job_dir) + 1 :]).is_file()

    calls.unlink()
    assert run(CASCADE_PRIOR_VARIANT="big", CASCADE_DECODER_VARIANT="big").returncode == 0
    ((_, _, patterns),) = [ast.literal_eval(line) for line in calls.read_text().splitlines()]
    assert patterns[:2] == ["stage_c_bf16.safetensors", "stage_b_bf16.safetensors"]


def test_server_pods_wait_for_the_marker_the_job_writes(
    res: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Run the init container's command: it waits while the marker is missing, exits 0 once it is
    there."""
    command, marker = wait_for_weights(res)
    local_marker = tmp_path / Path(marker).name
    proc = ManagedProcess(
        "wait-for-weights",
        command,
        tmp_path / "wait.log",
        env={"WEIGHTS_MARKER": str(local_marker), "PATH": "/usr/bin:/bin"},
    )
    try:
        wait_until(lambda: "waiting for" in proc.log_tail(), 30, "the waiting message", proc=proc)
        assert proc.alive(), "exited without the marker"
        local_marker.write_text("done\n")
        assert proc.wait(timeout=60) == 0, proc.log_tail()
        assert "weights complete" in proc.log_tail()
    finally:
        proc.stop()


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
        assert path.name in text, f"docs/deploy.md does not mention {path.relative_to(K8S)}"
    for topic in (
        "kubectl apply -k deploy/k8s/prometheus-adapter",
        "cascade-api-keys",
        "hf-token",
        "CASCADE_API_KEYS_FILE",
        ".cascade-weights-complete",
        "cascade_queue_depth",
        "terminationGracePeriodSeconds",
        "preStop",
        "CASCADE_DRAIN_TIMEOUT_S",
        "prometheus-adapter",
        "ReadWriteMany",
        "nvidia.com/gpu",
    ):
        assert topic in text, f"docs/deploy.md does not explain {topic}"
