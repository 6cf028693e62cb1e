"""Certificate lifetimes: said clearly at start and in the log, exported for alerts, on both sides."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import REGISTRY

from agent.cli import main as agent_main
from common.cert_validity import Validity
from common.config import AggregatorConfig
from common.errors import ConfigError
from common.identity import SpiffeId
from common.metrics import publish_validity
from common.pki import Issued, create_ca, issue_agent, issue_server, write_private
from common.tls import TlsFiles
from tests.conftest import TRUST_DOMAIN, Pki, aggregator_config

NOW = dt.datetime.now(dt.UTC)
AGENT = SpiffeId(TRUST_DOMAIN, "aws", "dated")


def _files(tmp: Path, leaf: Issued, ca: Issued, name: str = "leaf") -> TlsFiles:
    cert, key, ca_path = tmp / f"{name}.pem", tmp / f"{name}-key.pem", tmp / f"{name}-ca.pem"
    cert.write_bytes(leaf.cert_pem())
    write_private(key, leaf.key_pem())
    ca_path.write_bytes(ca.cert_pem())
    return TlsFiles(cert, key, ca_path)


def _gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.mark.parametrize(
    ("case", "problem", "soon"),
    [
        ("valid", None, None),
        ("expiring", None, "expires in 4.9 days"),
        ("expired", "expired at", None),
        ("not_yet_valid", "is not valid before", None),
        ("ca_expired", "the CA in tls.ca expired at", None),
        ("ca_expiring", None, "the CA in tls.ca expires in 10.0 days"),
    ],
)
def test_validity_names_what_is_wrong_and_what_ends_soon(
    tmp_path: Path, case: str, problem: str | None, soon: str | None
) -> None:
    ca_days = {"ca_expired": 1.0, "ca_expiring": 10.0}.get(case, 3650.0)
    ca_start = NOW - dt.timedelta(days=2) if case == "ca_expired" else NOW - dt.timedelta(minutes=5)
    ca = create_ca("dated CA", days=ca_days, not_before=ca_start)
    start, days = {
        "expiring": (NOW - dt.timedelta(days=85), 90.0 - 0.1),
        "expired": (NOW - dt.timedelta(days=91), 90.0),
        "not_yet_valid": (NOW + dt.timedelta(days=1), 90.0),
    }.get(case, (NOW - dt.timedelta(minutes=5), 30.0 if case == "ca_expiring" else 90.0))
    validity = Validity.of(_files(tmp_path, issue_agent(ca, AGENT, days, not_before=start), ca))
    said = validity.problem()
    assert (said is None) if problem is None else (said is not None and problem in said)
    warned = validity.expiring()
    assert (warned is None) if soon is None else (warned is not None and soon in warned), warned


def test_unreadable_files_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "ca.pem").write_text("")
    with pytest.raises(ConfigError, match="cannot read"):
        Validity.of(TlsFiles(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"))


def test_publish_validity_exports_both_ends_and_logs_what_peers_will_refuse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = create_ca("dated CA")
    expired = issue_agent(ca, AGENT, 1, not_before=NOW - dt.timedelta(days=2))
    with caplog.at_level(logging.WARNING, logger="common.metrics"):
        validity = publish_validity(_files(tmp_path, expired, ca))
    assert _gauge("cloudfed_tls_certificate_expiry_timestamp_seconds", role="cert") == (
        expired.cert.not_valid_after_utc.timestamp()
    )
    assert _gauge("cloudfed_tls_certificate_expiry_timestamp_seconds", role="ca") == (
        ca.cert.not_valid_after_utc.timestamp()
    )
    assert validity.problem() is not None
    [record] = caplog.records
    assert record.levelno == logging.ERROR and "peers will refuse the TLS handshake" in record.getMessage()
    caplog.clear()
    soon = issue_agent(ca, AGENT, 3)
    with caplog.at_level(logging.WARNING, logger="common.metrics"):
        publish_validity(_files(tmp_path, soon, ca, "soon"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING and "expires in 3.0 days" in record.getMessage()


def test_daemons_refuse_to_start_with_a_certificate_they_cannot_use(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = pki.dir.load_ca()
    old = NOW - dt.timedelta(days=100)
    server = _files(tmp_path, issue_server(ca, ["localhost"], days=90, not_before=old), ca, "server")
    config = aggregator_config(pki, tmp_path / "state")
    tls = dataclasses.replace(config.tls, cert=server.cert, key=server.key)
    with pytest.raises(ConfigError, match=r"tls.cert .*server.pem expired at"):
        AggregatorConfig.validate(dataclasses.replace(config, tls=tls))

    agent = _files(tmp_path, issue_agent(ca, AGENT, 90, not_before=old), ca, "agent")
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'aggregator = "127.0.0.1:9"\n[tls]\ncert = "{agent.cert}"\nkey = "{agent.key}"\nca = "{agent.ca}"\n'
    )
    assert agent_main(["--config", str(toml), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cloudfed-agent: tls.cert ") and "agent.pem expired at" in err
    assert "install a renewed certificate" in err


async def test_the_aggregator_exports_its_own_and_each_agents_certificate_end(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """Its own at start and again when a rotated certificate is read at the next handshake; each
    agent's from the certificate it joins with."""
    ca = pki.dir.load_ca()
    server = _files(tmp_path, issue_server(ca, ["localhost"], ["127.0.0.1"], days=40), ca, "server")
    config = aggregator_config(pki, tmp_path / "agg0")
    tls = dataclasses.replace(config.tls, cert=server.cert, key=server.key)
    run = await start_aggregator(config=dataclasses.replace(config, tls=tls))
    expiry = "cloudfed_tls_certificate_expiry_timestamp_seconds"
    first = x509.load_pem_x509_certificate(server.cert.read_bytes()).not_valid_after_utc
    assert _gauge(expiry, role="cert") == first.timestamp()

    async with run.client("dated") as client:
        await client.join(num_examples=1)
    joined = _gauge("cloudfed_agent_certificate_expiry_timestamp_seconds", cloud="aws", agent="dated")
    assert joined is not None and abs(joined - (NOW + dt.timedelta(days=90)).timestamp()) < 600

    renewed = issue_server(ca, ["localhost"], ["127.0.0.1"], days=80)
    server.key.unlink()
    write_private(server.key, renewed.key_pem())
    server.cert.write_bytes(renewed.cert_pem())
    async with run.client("after-rotation") as client:  # a new connection: a new handshake
        await client.join(num_examples=1)
    await asyncio.sleep(0)
    assert _gauge(expiry, role="cert") == renewed.cert.not_valid_after_utc.timestamp()
