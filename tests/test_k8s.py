"""The Kubernetes manifests: every kustomization renders, validates strictly and meets our policies."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.config import AgentConfig, AggregatorConfig, load
from server.state import StateDB
from tests.conftest import Pki, seed_store, small_adapter
from tests.daemons import run_cli

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
CLOUDS = ("aws", "gcp", "azure")
KUSTOMIZATIONS = ("base", *(f"overlays/{c}" for c in CLOUDS))
CUSTOM_SCHEMAS = {
    ("cert-manager.io/v1", "Certificate"): "certificate.cert-manager.io.v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
}
Doc = dict[str, Any]


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing in CI")
        pytest.skip("kubectl not installed")
    return exe


def render(kustomization: str) -> list[Doc]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: Doc) -> None:
    """Built-in kinds against the Kubernetes schema (strict); custom resources against ours."""
    schema_file = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if schema_file is None:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    else:
        schema = json.loads((K8S / "schemas" / schema_file).read_text())
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def pod_spec(workload: Doc) -> Doc:
    """The pod template's spec of a Deployment or a CronJob."""
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {k: render(k) for k in KUSTOMIZATIONS}


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_resource_validates_strictly(rendered: dict[str, list[Doc]], kustomization: str) -> None:
    docs = rendered[kustomization]
    assert docs
    for doc in docs:
        validate(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "cloudfed"


def test_validation_rejects_misspelt_and_mistyped_fields(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["overlays/aws"]
    deployment = copy.deepcopy(find(docs, "Deployment", "cloudfed-agent"))
    deployment["spec"]["replica"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    probe = copy.deepcopy(find(docs, "Deployment", "cloudfed-aggregator"))
    probe["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc-health"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(probe)
    certificate = copy.deepcopy(find(docs, "Certificate", "cloudfed-agent"))
    certificate["spec"]["uri"] = certificate["spec"].pop("uris")
    with pytest.raises(jsonschema.ValidationError):
        validate(certificate)
    monitor = copy.deepcopy(find(docs, "ServiceMonitor", "cloudfed-agent"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_meet_the_restricted_pod_security_standard(
    rendered: dict[str, list[Doc]], kustomization: str
) -> None:
    docs = rendered[kustomization]
    namespace = find(docs, "Namespace", "cloudfed")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert deployments
    for deployment in deployments:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
    for workload in [*deployments, *(d for d in docs if d["kind"] == "CronJob")]:
        pod = pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert "hostNetwork" not in pod and "hostPID" not in pod
        secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
        assert secret_volumes
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "add" not in sc["capabilities"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            # Mounted whole (no subPath) so that rotated certificates propagate into the pod.
            assert all("subPath" not in m for m in container["volumeMounts"])
            mounted = {m["name"] for m in container["volumeMounts"]}
            assert secret_volumes <= mounted
            if workload["kind"] == "CronJob":
                continue  # a job serves nothing: no ports, no probes
            # Native gRPC probes on the plaintext health port, given as an integer.
            health_port = next(p for p in container["ports"] if p["name"] == "grpc-health")["containerPort"]
            for probe in ("startupProbe", "livenessProbe"):
                assert container[probe]["grpc"]["port"] == health_port
                assert isinstance(container[probe]["grpc"]["port"], int)


def test_network_policies_let_only_agents_and_prometheus_in(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["overlays/aws"]
    deny = find(docs, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    rules = find(docs, "NetworkPolicy", "cloudfed-aggregator")["spec"]["ingress"]
    by_port: dict[int, list[Doc]] = {}
    for rule in rules:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    assert set(by_port) == {7443, 9464}
    agents = [p for p in by_port[7443] if "podSelector" in p]
    assert agents == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cloudfed-agent"}}}]
    remote = {p["ipBlock"]["cidr"] for p in by_port[7443] if "ipBlock" in p}
    external = find(docs, "Service", "cloudfed-aggregator-external")
    assert remote == set(external["spec"]["loadBalancerSourceRanges"])
    assert [p["port"] for p in external["spec"]["ports"]] == [7443]  # metrics never leave the cluster
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    assert all(p["podSelector"]["matchLabels"] == prometheus for p in by_port[9464])
    agent_rules = find(docs, "NetworkPolicy", "cloudfed-agent")["spec"]["ingress"]
    assert [p["port"] for r in agent_rules for p in r["ports"]] == [9465]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_each_cloud_overlay_sets_cloud_aggregator_and_gpus(
    rendered: dict[str, list[Doc]], cloud: str
) -> None:
    docs = rendered[f"overlays/{cloud}"]
    agent = find(docs, "Deployment", "cloudfed-agent")
    assert agent["metadata"]["labels"]["cloudfed.dev/cloud"] == cloud
    container = agent["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["CLOUDFED_AGENT_DEVICE"] == "cuda"
    assert env["CLOUDFED_AGENT_AGGREGATOR"].endswith(":7443")
    assert float(env["CLOUDFED_AGENT_EGRESS_PRICE_PER_GB"]) > 0
    assert container["image"].endswith("-cuda")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    certificate = find(docs, "Certificate", "cloudfed-agent")
    assert certificate["spec"]["uris"] == [f"spiffe://fed.example.org/cloud/{cloud}/agent/agent-0"]
    assert certificate["spec"]["secretName"] == "cloudfed-agent-tls"
    hosts_aggregator = any(
        d["kind"] == "Deployment" and d["metadata"]["name"] == "cloudfed-aggregator" for d in docs
    )
    assert hosts_aggregator == (cloud == "aws")


def test_metrics_services_and_service_monitors_line_up(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["overlays/aws"]
    for workload, service, port in (
        ("cloudfed-aggregator", "cloudfed-aggregator", 9464),
        ("cloudfed-agent", "cloudfed-agent-metrics", 9465),
    ):
        svc = find(docs, "Service", service)
        pod_labels = find(docs, "Deployment", workload)["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        monitor = find(docs, "ServiceMonitor", workload)
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        metrics = next(
            p for p in svc["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"]
        )
        assert metrics["port"] == port
        # The job label matches the scrape jobs that deploy/prometheus and the alerts use.
        assert svc["metadata"]["labels"][monitor["spec"]["jobLabel"]] == workload


def test_configs_in_the_base_load_and_match_the_deployments(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["base"]
    aggregator = load(AggregatorConfig, K8S / "base" / "aggregator" / "aggregator.toml", env={})
    agent = load(AgentConfig, K8S / "base" / "agent" / "agent.toml", env={})
    for config, workload, mount in (
        (aggregator, "cloudfed-aggregator", "/var/lib/cloudfed"),
        (agent, "cloudfed-agent", "/var/lib/cloudfed-agent"),
    ):
        container = find(docs, "Deployment", workload)["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[str(config.state_dir)] == "state" and str(config.state_dir) == mount
        assert mounts[str(config.tls.cert.parent)] == "tls"
        if config is aggregator:
            assert aggregator.tls.crl is not None and mounts[str(aggregator.tls.crl.parent)] == "crl"
            volumes = {
                v["name"]: v
                for v in find(docs, "Deployment", workload)["spec"]["template"]["spec"]["volumes"]
            }
            assert volumes["crl"]["configMap"]["name"] == "cloudfed-crl"
        ports = {p["containerPort"] for p in container["ports"]}
        assert int(config.health_listen.rsplit(":", 1)[1]) in ports
        assert int(config.metrics_listen.rsplit(":", 1)[1]) in ports
        config_file = container["command"][container["command"].index("--config") + 1]
        assert mounts[str(Path(config_file).parent)] == "config"
    assert tomllib.loads((K8S / "base" / "agent" / "agent.toml").read_text())["data"] == "/data"


def test_the_backup_cronjob_copies_the_aggregator_state_daily_on_its_node(
    rendered: dict[str, list[Doc]], pki: Pki, tmp_path: Path
) -> None:
    """The CronJob runs the systemd timer's backup beside the live aggregator: its config, files
    and state claim (on the aggregator's node, as the claim is ReadWriteOnce), into a claim of its
    own, one run at a time, with no network. Its command, run here against the base config with
    only the paths moved, writes a backup."""
    docs = rendered["overlays/aws"]
    cron = find(docs, "CronJob", "cloudfed-aggregator-backup")
    aggregator = find(docs, "Deployment", "cloudfed-aggregator")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    pod, daemon_pod = pod_spec(cron), pod_spec(aggregator)
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == daemon_pod["securityContext"]  # the files' owner
    [affinity] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    daemon_labels = aggregator["spec"]["template"]["metadata"]["labels"]
    assert affinity["labelSelector"]["matchLabels"].items() <= daemon_labels.items()
    assert not (
        pod_labels := cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    ).items() <= (daemon_labels.items())  # not selected as an aggregator pod by its Service or NetworkPolicy

    [container], [daemon] = pod["containers"], daemon_pod["containers"]
    assert container["image"] == daemon["image"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    daemon_volumes = {v["name"]: v for v in daemon_pod["volumes"]}
    for name in (
        "config",
        "tls",
        "crl",
        "state",
    ):  # the same sources (hashed ConfigMap name too) at the same paths
        assert volumes[name] == daemon_volumes[name]
        mount = next(m for m in container["volumeMounts"] if m["name"] == name)
        assert mount == next(m for m in daemon["volumeMounts"] if m["name"] == name)
    backups_claim = volumes["backups"]["persistentVolumeClaim"]["claimName"]
    assert backups_claim != volumes["state"]["persistentVolumeClaim"]["claimName"]
    find(docs, "PersistentVolumeClaim", backups_claim)
    into = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "backups")
    command = container["command"]
    assert command[0] == "cloudfed-aggregator"
    assert (
        command[command.index("--config") + 1] == daemon["command"][daemon["command"].index("--config") + 1]
    )
    assert command[command.index("backup") + 1 :] == ["--into", into, "--keep", "7"]
    policy = find(docs, "NetworkPolicy", "cloudfed-aggregator-backup")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert (
        policy["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy and "egress" not in policy
    )

    state = tmp_path / "state"
    seed_store(state, small_adapter())
    StateDB(state / "cloudfed.db").close()
    config = K8S / "base" / "aggregator" / "aggregator.toml"
    args = [str(config) if a.endswith("aggregator.toml") else a for a in command[1:]]
    args = [str(tmp_path / "backups") if a == into else a for a in args]
    d = pki.dir
    moved = {
        "CLOUDFED_STATE_DIR": str(state),
        "CLOUDFED_TLS_CERT": str(d.cert("aggregator")),
        "CLOUDFED_TLS_KEY": str(d.key("aggregator")),
        "CLOUDFED_TLS_CA": str(d.ca_cert),
        "CLOUDFED_TLS_CRL": str(d.crl),
    }
    done = run_cli("server.cli", *args, env=moved)
    assert done.returncode == 0, done.stderr
    [backup] = (tmp_path / "backups").iterdir()
    assert backup.name.startswith("backup-") and (backup / "cloudfed.db").is_file()
