"""The shipped Prometheus config, alert rules and Grafana dashboard are valid and match the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from prometheus_client import REGISTRY

import agent.metrics
import common.metrics
import server.metrics
from tests.promtool import promtool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cloudfed.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
_METRIC = re.compile(r"\b((?:cloudfed|grpc_server)_[a-z0-9_]+)")


def exported_sample_names() -> set[str]:
    """Every sample name the daemons' metric definitions can produce."""
    assert agent.metrics and common.metrics and server.metrics  # imported for their registrations
    names = {"up"}
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def panels() -> list[dict]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_every_panel_query_names_an_exported_metric_and_filters_job_and_instance() -> None:
    exported = exported_sample_names()
    seen = set()
    for panel in panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            metrics = set(_METRIC.findall(expr))
            assert metrics, (panel["title"], expr)
            assert metrics <= exported, (panel["title"], metrics - exported)
            assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, panel["title"]
            if "rate(" in expr or "increase(" in expr:
                assert "[$__rate_interval]" in expr, panel["title"]
            seen |= metrics
    # The rows the issue asks for are all there.
    for needed in (
        "cloudfed_transfer_bytes_total",
        "cloudfed_egress_cost_dollars_total",
        "cloudfed_update_raw_bytes_total",
        "cloudfed_round_phase_seconds_bucket",
        "grpc_server_handled_total",
        "cloudfed_agents",
        "cloudfed_stragglers_dropped_total",
        "cloudfed_eval_loss",
    ):
        assert needed in seen, needed


def test_every_panel_has_a_unit_and_the_templated_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance"} <= set(variables)
    for panel in panels():
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/cloudfed.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    dash = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cloudfed.yml").read_text())
    assert dash["providers"][0]["type"] == "file"


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    config = promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = promtool("check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 17 rules found" in rules.stdout


def test_alert_rules_only_use_exported_metrics() -> None:
    exported = exported_sample_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert set(_METRIC.findall(rule["expr"])) <= exported, rule["alert"]


TLS_EXPIRY = "cloudfed_tls_certificate_expiry_timestamp_seconds"
AGENT_EXPIRY = "cloudfed_agent_certificate_expiry_timestamp_seconds"
RECEIVED = "cloudfed_transfer_bytes_total"
WITHHELD = "cloudfed_eval_withheld"
AWS_USERS = {"cloud": "aws", "agent": "a1", "unit": "user"}
GCP_RECORDS = {"cloud": "gcp", "agent": "a2", "unit": "record"}


def test_the_alerts_fire_on_their_series(tmp_path: Path) -> None:
    """promtool's rule unit tests: a CRL 2 days from its next update, a refused CRL file, a revoked
    certificate still calling, a daemon's certificate 5 days from its end and an active agent's
    likewise, an agent past 90% of its privacy budget (training, or its held-out data's), one whose
    latest eval loss is not finite and one whose DP has kept its eval losses in its cloud for an
    hour each fire their alert; a CRL or certificate 20 days out, an agent with nothing received
    in a day, one at 7 of 8 epsilon (or 2 of 8 on its held-out data), one that shares no eval
    loss by policy, or one whose eval losses are back, does not. The annotations are
    left out of the copy: promtool would compare them word for word."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
                        "values": v,
                    }
                    for name, labels, v in (
                        ("cloudfed_crl_next_update_timestamp_seconds", {"instance": "a"}, "172800x120"),
                        ("cloudfed_crl_next_update_timestamp_seconds", {"instance": "b"}, "864000x120"),
                        ("cloudfed_crl_reload_failures_total", {"instance": "a"}, "0 0 1 1 1"),
                        (
                            "cloudfed_revoked_calls_total",
                            {"cloud": "aws", "agent": "a1", "when": "refused"},
                            "0 0 3 3",
                        ),
                        (
                            "cloudfed_revoked_calls_total",
                            {"cloud": "gcp", "agent": "a2", "when": "ended"},
                            "0 0 1 1",
                        ),
                        (TLS_EXPIRY, {"job": "j", "instance": "a", "role": "cert"}, "432000x120"),
                        (TLS_EXPIRY, {"job": "j", "instance": "a", "role": "ca"}, "1728000x120"),
                        (AGENT_EXPIRY, {"cloud": "aws", "agent": "a1"}, "432000x120"),
                        (AGENT_EXPIRY, {"cloud": "gcp", "agent": "gone"}, "432000x120"),
                        (
                            RECEIVED,
                            {"direction": "received", "kind": "update", "cloud": "aws", "agent": "a1"},
                            "0+100x120",
                        ),
                        (
                            RECEIVED,
                            {"direction": "received", "kind": "update", "cloud": "gcp", "agent": "gone"},
                            "5x120",
                        ),
                        ("cloudfed_agent_dp_epsilon", AWS_USERS, "1 3 7.5x10"),
                        ("cloudfed_agent_dp_epsilon_budget", AWS_USERS, "8x12"),
                        ("cloudfed_agent_dp_epsilon", GCP_RECORDS, "1 3 7x10"),
                        ("cloudfed_agent_dp_epsilon_budget", GCP_RECORDS, "8x12"),
                        ("cloudfed_agent_dp_eval_epsilon", AWS_USERS, "0.5 7.5x10"),
                        ("cloudfed_agent_dp_eval_epsilon", GCP_RECORDS, "0.5 2x10"),
                        (WITHHELD, {"cloud": "aws", "agent": "a1", "reason": "not_finite"}, "0 1 1 0"),
                        (WITHHELD, {"cloud": "aws", "agent": "a1", "reason": "too_noisy"}, "0x120"),
                        (WITHHELD, {"cloud": "gcp", "agent": "a2", "reason": "privacy_budget"}, "1x120"),
                        (WITHHELD, {"cloud": "azure", "agent": "a3", "reason": "not_shared"}, "1x120"),
                        (WITHHELD, {"cloud": "azure", "agent": "a4", "reason": "too_noisy"}, "1x30 0x90"),
                    )
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "90m",
                        "alertname": "CloudfedCrlExpiring",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "a"}}],
                    },
                    {"eval_time": "30m", "alertname": "CloudfedCrlExpiring", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "CloudfedCertificateExpiring",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "job": "j",
                                    "instance": "a",
                                    "role": "cert",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "90m",
                        "alertname": "CloudfedAgentCertificateExpiring",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "cloud": "aws", "agent": "a1"}}
                        ],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "CloudfedAgentPrivacyBudgetNearlySpent",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", **AWS_USERS}}],
                    },
                    {
                        "eval_time": "1m",
                        "alertname": "CloudfedAgentPrivacyBudgetNearlySpent",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "5m",
                        "alertname": "CloudfedAgentEvalPrivacyBudgetNearlySpent",
                        "exp_alerts": [{"exp_labels": {"severity": "info", **AWS_USERS}}],
                    },
                    {
                        "eval_time": "0m",
                        "alertname": "CloudfedAgentEvalPrivacyBudgetNearlySpent",
                        "exp_alerts": [],
                    },
                    {
                        "eval_time": "2m",
                        "alertname": "CloudfedAgentEvalNotFinite",
                        "exp_alerts": [
                            {"exp_labels": {"severity": "warning", "cloud": "aws", "agent": "a1"}}
                        ],
                    },
                    {"eval_time": "3m", "alertname": "CloudfedAgentEvalNotFinite", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "CloudfedAgentEvalLossesWithheld",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "info",
                                    "cloud": "gcp",
                                    "agent": "a2",
                                    "reason": "privacy_budget",
                                }
                            }
                        ],
                    },
                    {"eval_time": "50m", "alertname": "CloudfedAgentEvalLossesWithheld", "exp_alerts": []},
                    {
                        "eval_time": "4m",
                        "alertname": "CloudfedCrlRefused",
                        "exp_alerts": [{"exp_labels": {"severity": "critical", "instance": "a"}}],
                    },
                    {
                        "eval_time": "4m",
                        "alertname": "CloudfedRevokedCertificateInUse",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "cloud": "aws",
                                    "agent": "a1",
                                    "when": "refused",
                                }
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_metrics_endpoint_over_tls_requires_a_client_certificate(pki) -> None:
    import socket
    import ssl
    import urllib.error
    import urllib.request

    from common.metrics import serve_metrics
    from common.metrics_server import MetricsTls

    d = pki.dir
    port = serve_metrics("127.0.0.1:0", MetricsTls(d.cert("aggregator"), d.key("aggregator"), d.ca_cert))
    url = f"https://127.0.0.1:{port}/metrics"
    scraper = pki.agent("prometheus", cloud="ops")
    with_cert = ssl.create_default_context(cafile=str(d.ca_cert))
    with_cert.load_cert_chain(str(scraper.cert), str(scraper.key))
    with urllib.request.urlopen(url, context=with_cert, timeout=5) as reply:
        status, body = reply.status, reply.read()
    assert status == 200
    assert b"cloudfed_transfer_bytes" in body
    without_cert = ssl.create_default_context(cafile=str(d.ca_cert))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError, socket.error)):
        urllib.request.urlopen(url, context=without_cert, timeout=5).read()


def test_metrics_endpoint_serves_a_bounded_number_of_connections_at_once() -> None:
    """MAX_CONNECTIONS idle connections hold every slot: one more is closed at once, unserved;
    once they go, scrapes are served again (bounded waits, loopback only)."""
    import socket
    import time
    import urllib.request

    from common.metrics import serve_metrics
    from common.metrics_server import MAX_CONNECTIONS

    port = serve_metrics("127.0.0.1:0")
    url = f"http://127.0.0.1:{port}/metrics"
    assert urllib.request.urlopen(url, timeout=5).status == 200
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # the server has accepted them all
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            try:
                reply = extra.recv(1024)
            except ConnectionResetError:
                reply = b""
        assert reply == b""  # closed without an answer
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert urllib.request.urlopen(url, timeout=5).status == 200
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
