"""mTLS on the aggregator's port: who gets in, with which status."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.client import AggregatorClient
from common.grpc_options import channel_options
from common.identity import SpiffeId
from common.pki import Issued, PkiDir, create_ca, issue_agent, write_private
from common.tls import TlsFiles
from protos.cloudfed.v1 import federation_pb2 as pb
from protos.cloudfed.v1 import federation_pb2_grpc as pb_grpc
from tests.conftest import TRUST_DOMAIN, Pki, aggregator_config


def _write(tmp: Path, name: str, issued: Issued, ca_pem: Path) -> TlsFiles:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}-key.pem"
    cert.write_bytes(issued.cert_pem())
    write_private(key, issued.key_pem())
    return TlsFiles(cert, key, ca_pem)


def _self_signed(spiffe: SpiffeId) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe.uri)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


async def _join_code(target: str, files: TlsFiles) -> grpc.StatusCode:
    async with AggregatorClient(target, files, server_name="localhost", attempts=1) as client:
        try:
            await client.join(num_examples=1)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_valid_agent_is_identified_from_its_certificate(start_aggregator, pki: Pki) -> None:
    run = await start_aggregator()
    async with run.client("alice") as client:
        reply = await client.join(num_examples=10)
    assert reply.agent_id == f"spiffe://{TRUST_DOMAIN}/cloud/aws/agent/alice"
    assert reply.settings.layout.digest == run.agg.rounds.layout.digest
    assert run.agg.rounds.agents[reply.agent_id].num_examples == 10


async def test_no_client_certificate_fails_the_handshake(start_aggregator, pki: Pki) -> None:
    run = await start_aggregator()
    creds = grpc.ssl_channel_credentials(root_certificates=pki.dir.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(run.target, creds, options=channel_options("localhost")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.FederationServiceStub(ch).Join(pb.JoinRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert run.agg.rounds.agents == {}


@pytest.mark.parametrize("case", ["self_signed", "other_ca", "expired", "not_yet_valid"])
async def test_untrusted_certificates_fail_the_handshake(
    start_aggregator, pki: Pki, tmp_path: Path, case: str
) -> None:
    run = await start_aggregator()
    spiffe = SpiffeId(TRUST_DOMAIN, "aws", "mallory")
    now = dt.datetime.now(dt.UTC)
    issued = {
        "self_signed": lambda: _self_signed(spiffe),
        "other_ca": lambda: issue_agent(create_ca("another CA"), spiffe),
        "expired": lambda: issue_agent(
            pki.dir.load_ca(), spiffe, days=1, not_before=now - dt.timedelta(days=3)
        ),
        "not_yet_valid": lambda: issue_agent(
            pki.dir.load_ca(), spiffe, days=9, not_before=now + dt.timedelta(days=2)
        ),
    }[case]()
    files = _write(tmp_path, case, issued, pki.dir.ca_cert)
    assert await _join_code(run.target, files) == grpc.StatusCode.UNAVAILABLE
    assert run.agg.rounds.agents == {}


async def test_identity_outside_trust_domain_is_unauthenticated(start_aggregator, pki: Pki) -> None:
    run = await start_aggregator()
    files = pki.agent("eve", domain="other.domain")
    assert await _join_code(run.target, files) == grpc.StatusCode.UNAUTHENTICATED
    assert run.agg.rounds.agents == {}


async def test_client_certificate_without_spiffe_id_is_unauthenticated(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from common.pki import _leaf

    run = await start_aggregator()
    no_uri = _leaf(
        pki.dir.load_ca(),
        "client",
        [x509.DNSName("client.example")],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        1,
        None,
    )  # valid client chain, no SPIFFE URI SAN
    files = _write(tmp_path, "nospiffe", no_uri, pki.dir.ca_cert)
    assert await _join_code(run.target, files) == grpc.StatusCode.UNAUTHENTICATED
    assert run.agg.rounds.agents == {}


async def test_agent_outside_allow_list_is_permission_denied(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    import dataclasses

    from tests.conftest import seed_store, small_adapter

    state = tmp_path / "allow"
    seed_store(state, small_adapter())
    cfg = dataclasses.replace(
        aggregator_config(pki, state), allowed_agents=(f"spiffe://{TRUST_DOMAIN}/cloud/gcp/agent/*",)
    )
    run = await start_aggregator(config=cfg)
    assert await _join_code(run.target, pki.agent("bob", cloud="aws")) == grpc.StatusCode.PERMISSION_DENIED
    assert await _join_code(run.target, pki.agent("bob", cloud="gcp")) == grpc.StatusCode.OK


def test_pki_writes_private_keys_0600_and_one_spiffe_san(tmp_path: Path) -> None:
    d = PkiDir(tmp_path / "pki")
    ca = d.init("ca")
    cert, key = d.save("a", issue_agent(ca, SpiffeId("x.org", "aws", "a1")))
    assert key.stat().st_mode & 0o777 == 0o600
    assert d.ca_key.stat().st_mode & 0o777 == 0o600
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://x.org/cloud/aws/agent/a1"]
    assert [n for n, _ in d.list()] == ["ca", "a"]
    with pytest.raises(Exception, match="exists"):
        d.init("ca")


async def test_a_ca_bundle_admits_agents_of_either_ca(start_aggregator, pki: Pki, tmp_path: Path) -> None:
    """A CA rotation without a flag day: the aggregator's tls.ca holds the old and the new CA, so
    an agent already moved to the new CA and one not yet moved both get in."""
    new_ca = create_ca("next CA")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.dir.ca_cert.read_bytes() + new_ca.cert_pem())
    config = aggregator_config(pki, tmp_path / "agg0")
    run = await start_aggregator(
        config=dataclasses.replace(config, tls=dataclasses.replace(config.tls, ca=bundle))
    )
    moved = _write(tmp_path, "moved", issue_agent(new_ca, SpiffeId(TRUST_DOMAIN, "gcp", "moved")), bundle)
    assert await _join_code(run.target, moved) == grpc.StatusCode.OK
    assert await _join_code(run.target, pki.agent("staying")) == grpc.StatusCode.OK
    assert sorted(run.agg.rounds.agents) == [
        f"spiffe://{TRUST_DOMAIN}/cloud/aws/agent/staying",
        f"spiffe://{TRUST_DOMAIN}/cloud/gcp/agent/moved",
    ]
