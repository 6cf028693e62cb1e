"""The real aggregator's TLS, on its gRPC port and its TLS /metrics port: TLS 1.2 and 1.3 only,
forward-secret AEAD suites only, a client certificate required, no finding from testssl.sh, and a
rotated metrics certificate served without a restart."""

from __future__ import annotations

import socket
import ssl
import threading
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from common.pki import issue_server
from tests.conftest import TRUST_DOMAIN, Pki, seed_store, small_adapter
from tests.daemons import free_port, start, stop, wait_serving
from tests.testssl import PROBLEMS, run_testssl

pytestmark = pytest.mark.slow
CBC_SUITES = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"
AEAD_SUITE = "ECDHE-ECDSA-AES128-GCM-SHA256"


@dataclass(frozen=True)
class Ports:
    grpc: int
    metrics: int
    metrics_cert: Path
    metrics_key: Path


@pytest.fixture(scope="module")
def aggregator(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ports]:
    """The aggregator daemon with mTLS on its API and on /metrics (client CA required)."""
    tmp = tmp_path_factory.mktemp("tls")
    d = pki.dir
    # the metrics endpoint gets its own copy of the server files, so the rotation test can replace them
    metrics_cert, metrics_key = tmp / "metrics.pem", tmp / "metrics-key.pem"
    metrics_cert.write_bytes(d.cert("aggregator").read_bytes())
    metrics_key.write_bytes(d.key("aggregator").read_bytes())
    ports = Ports(free_port(), free_port(), metrics_cert, metrics_key)
    health = free_port()
    seed_store(tmp / "state", small_adapter())
    config = tmp / "aggregator.toml"
    config.write_text(
        f'listen = "127.0.0.1:{ports.grpc}"\nhealth_listen = "127.0.0.1:{health}"\n'
        f'metrics_listen = "127.0.0.1:{ports.metrics}"\nmetrics_cert = "{metrics_cert}"\n'
        f'metrics_key = "{metrics_key}"\nmetrics_client_ca = "{d.ca_cert}"\n'
        f'state_dir = "{tmp / "state"}"\ntrust_domain = "{TRUST_DOMAIN}"\n'
        f'[tls]\ncert = "{d.cert("aggregator")}"\nkey = "{d.key("aggregator")}"\nca = "{d.ca_cert}"\n'
        "[rounds]\nmin_agents = 1\n"
    )
    proc = start("server.cli", "--config", str(config), log=tmp / "agg.log")
    try:
        wait_serving(health)
        yield ports
    finally:
        assert stop(proc) == 0, (tmp / "agg.log").read_text()[-3000:]


def _client(version: ssl.TLSVersion, suites: str, pki: Pki | None) -> ssl.SSLContext:
    with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = version
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers(suites)
    ctx.set_alpn_protocols(["h2"])
    if pki is not None:
        files = pki.agent("probe", cloud="gcp")
        ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext) -> tuple[str, str, bytes]:
    """(protocol, suite, server certificate) of a completed handshake; raises ssl.SSLError."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0], tls.getpeercert(binary_form=True) or b""


def _lenient_server(pki: Pki) -> int:
    """A control: a TLS server that accepts TLS 1.0+ and every suite, for 6 handshakes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.load_cert_chain(str(pki.dir.cert("aggregator")), str(pki.dir.key("aggregator")))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            for _ in range(6):
                conn, _ = listener.accept()
                try:
                    ctx.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


OLD_OR_CBC = [
    (ssl.TLSVersion.TLSv1, "ALL:@SECLEVEL=0"),
    (ssl.TLSVersion.TLSv1_1, "ALL:@SECLEVEL=0"),
    (ssl.TLSVersion.TLSv1_2, CBC_SUITES),
]


def test_old_protocols_and_cbc_suites_are_refused_on_both_ports(aggregator: Ports, pki: Pki) -> None:
    """TLS 1.0, 1.1 and TLS 1.2 CBC suites: refused by both ports, while the same client
    completes each handshake with a lenient server (so the refusal is the aggregator's)."""
    control = _lenient_server(pki)
    for version, suites in OLD_OR_CBC:
        assert _handshake(control, _client(version, suites, pki))[1], version
    for port in (aggregator.grpc, aggregator.metrics):
        for version, suites in OLD_OR_CBC:
            with pytest.raises(ssl.SSLError):
                _handshake(port, _client(version, suites, pki))


def test_tls12_aead_and_tls13_are_accepted_on_both_ports(aggregator: Ports, pki: Pki) -> None:
    for port in (aggregator.grpc, aggregator.metrics):
        assert _handshake(port, _client(ssl.TLSVersion.TLSv1_2, AEAD_SUITE, pki))[:2] == (
            "TLSv1.2",
            AEAD_SUITE,
        )
        assert _handshake(port, _client(ssl.TLSVersion.TLSv1_3, "DEFAULT", pki))[0] == "TLSv1.3"


def _expiry(port: int, pki: Pki) -> dict[str, float]:
    """The daemon's certificate end dates by role, scraped over mTLS."""
    scraper = pki.agent("prometheus", cloud="ops")
    ctx = ssl.create_default_context(cafile=str(pki.dir.ca_cert))
    ctx.load_cert_chain(str(scraper.cert), str(scraper.key))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=ctx, timeout=10) as reply:
        text = reply.read().decode()
    return {
        s.labels["role"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "cloudfed_tls_certificate_expiry_timestamp_seconds"
        for s in family.samples
    }


def test_a_rotated_metrics_certificate_is_served_without_a_restart(aggregator: Ports, pki: Pki) -> None:
    """cert-manager rewrites the files: the next scrape's handshake presents the new certificate,
    and the end date the expiry alert watches (role metrics_cert) is the new one's."""
    client = _client(ssl.TLSVersion.TLSv1_3, "DEFAULT", pki)
    before = _handshake(aggregator.metrics, client)[2]
    dates = _expiry(aggregator.metrics, pki)
    old_end = x509.load_der_x509_certificate(before).not_valid_after_utc.timestamp()
    assert dates["metrics_cert"] == old_end
    assert dates["metrics_client_ca"] == pki.dir.load_ca().cert.not_valid_after_utc.timestamp()
    new = issue_server(pki.dir.load_ca(), ["localhost"], ["127.0.0.1"], days=20)
    cert_pem, key_pem = new.cert_pem(), new.key_pem()
    aggregator.metrics_key.write_bytes(key_pem)
    aggregator.metrics_cert.write_bytes(cert_pem)
    after = _handshake(aggregator.metrics, client)[2]
    assert before != after
    assert ssl.DER_cert_to_PEM_cert(after).strip() == cert_pem.decode().strip()
    new_end = new.cert.not_valid_after_utc.timestamp()
    assert new_end < old_end - 60 * 86400  # 20 days, not the default 90
    assert _expiry(aggregator.metrics, pki)["metrics_cert"] == new_end


def test_testssl_finds_nothing_on_either_port(aggregator: Ports, tmp_path: Path) -> None:
    for name, port in (("grpc", aggregator.grpc), ("metrics", aggregator.metrics)):
        findings = run_testssl(f"127.0.0.1:{port}", tmp_path / f"{name}.json")
        by_id = {f["id"]: f for f in findings}
        assert by_id["TLS1_3"]["finding"].startswith("offered"), (name, by_id.get("TLS1_3"))
        for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
            assert by_id[old]["finding"] == "not offered", (name, by_id[old])
        problems = [(f["id"], f["severity"], f["finding"]) for f in findings if f["severity"] in PROBLEMS]
        assert not problems, (name, problems)
