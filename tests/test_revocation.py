"""Certificate revocation: the CRL the PKI writes, its checks, and the aggregator enforcing it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import REGISTRY

from agent.client import AggregatorClient
from agent.demo import TRUST_DOMAIN as DEMO_DOMAIN
from agent.revocations import AgentRevocations, describe_revocations
from common.config import AgentTlsConfig, AggregatorConfig, load
from common.errors import ConfigError
from common.identity import SpiffeId
from common.pki import PkiDir, build_crl, create_ca, issue_agent, revoked_entry
from common.pki_cli import main as pki_main
from common.revocation import RevocationError, RevocationList
from common.secagg.keys import RosterError
from protos.cloudfed.v1 import federation_pb2 as pb
from tests.agentsim import Watcher, upload_header, write_payload
from tests.conftest import TRUST_DOMAIN, Pki, aggregator_config
from tests.daemons import run_cli
from tests.test_faults import Federation, query, wait_until


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- the PKI's CRL -------------------------------------------------------------------------------


def test_cli_revokes_by_name_and_serial_keeps_entries_and_lists_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ["--dir", str(tmp_path / "pki")]
    assert pki_main([*d, "init", "--trust-domain", TRUST_DOMAIN]) == 0
    pki = PkiDir(tmp_path / "pki")
    assert RevocationList.load(pki.crl, pki.ca_cert).entries == {}  # init writes an empty, valid CRL
    for name in ("a1", "a2", "a3"):
        assert pki_main([*d, "agent", "--cloud", "aws", "--name", name]) == 0
    a1, a2, a3 = (_serial(pki.cert(f"aws-{n}")) for n in ("a1", "a2", "a3"))
    capsys.readouterr()

    assert pki_main([*d, "revoke", "aws-a1", "--reason", "key_compromise"]) == 0
    assert "aws-a1 (spiffe://test.cloudfed/cloud/aws/agent/a1) revoked" in capsys.readouterr().out
    assert pki_main([*d, "revoke", "--serial", f"{a3:x}"]) == 0
    assert pki_main([*d, "revoke", "aws-a1"]) == 0  # again: no duplicate entry
    assert "already revoked" in capsys.readouterr().out
    first = RevocationList.load(pki.crl, pki.ca_cert)
    ca_issuer = pki.load_ca().cert.subject.public_bytes()
    assert set(first.entries) == {(ca_issuer, a1), (ca_issuer, a3)}
    assert first.entries[(ca_issuer, a1)].reason == "keyCompromise"
    assert first.entries[(ca_issuer, a3)].reason == "unspecified"
    assert first.numbers[ca_issuer] == 4  # init, then three re-signings

    assert pki_main([*d, "crl", "--days", "2"]) == 0
    assert "re-signed: 2 revoked, valid 2 days" in capsys.readouterr().out
    refreshed = RevocationList.load(pki.crl, pki.ca_cert)
    assert refreshed.entries == first.entries
    assert refreshed.numbers[ca_issuer] == 5
    assert refreshed.next_update is not None
    assert dt.timedelta(days=1.9) < refreshed.next_update - dt.datetime.now(dt.UTC) < dt.timedelta(days=2)
    first.check_successor(refreshed)

    assert pki_main([*d, "list"]) == 0
    rows = {line.split()[0]: line.split()[3] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"ca": "valid", "aws-a1": "revoked", "aws-a2": "valid", "aws-a3": "revoked"}
    assert (ca_issuer, a2) not in refreshed.entries


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["revoke", "aws-nobody"], "no issued certificate named 'aws-nobody'"),
        (["revoke", "ca"], "no issued certificate named 'ca'"),
        (["revoke", "--serial", "xyz"], "is not a hex number"),
    ],
)
def test_cli_revoke_refuses_what_it_cannot_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    d = ["--dir", str(tmp_path / "pki")]
    assert pki_main([*d, "init", "--trust-domain", TRUST_DOMAIN]) == 0
    before = (tmp_path / "pki" / "crl.pem").read_bytes()
    assert pki_main([*d, *args]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "pki" / "crl.pem").read_bytes() == before


def test_a_crl_must_be_signed_by_a_ca_of_the_bundle_and_not_from_the_future(tmp_path: Path) -> None:
    ours, other = create_ca("ours"), create_ca("other")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(ours.cert_pem())
    crl = tmp_path / "crl.pem"

    crl.write_bytes(_pem(build_crl(other, [revoked_entry(7)], 1)))
    with pytest.raises(RevocationError, match="CRL of CN=other is not signed by a CA in"):
        RevocationList.load(crl, ca)
    # A CRL naming our CA as issuer but signed with another key.
    forged = build_crl(type(ours)(ours.cert, other.key), [revoked_entry(7)], 1)
    crl.write_bytes(_pem(forged))
    with pytest.raises(RevocationError, match="is not signed by a CA in"):
        RevocationList.load(crl, ca)
    crl.write_bytes(b"not a CRL")
    with pytest.raises(RevocationError, match="no PEM CRL"):
        RevocationList.load(crl, ca)
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(RevocationError, match="unreadable CRL"):
        RevocationList.load(crl, ca)
    crl.write_bytes(_pem(build_crl(ours, [], 1)))
    future = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    with pytest.raises(RevocationError, match="in the future"):
        RevocationList.load(crl, ca, now=future)
    crl.write_bytes(_pem(build_crl(ours, [], 1)) + _pem(build_crl(ours, [], 2)))
    with pytest.raises(RevocationError, match="two CRLs of CN=ours"):
        RevocationList.load(crl, ca)


def test_a_ca_bundle_takes_one_crl_per_ca_and_entries_name_their_issuer(tmp_path: Path) -> None:
    """During a CA rotation the bundle trusts both CAs; each CA's CRL revokes only its own serials."""
    old, new = create_ca("old"), create_ca("new")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(old.cert_pem() + new.cert_pem())
    spiffe = SpiffeId(TRUST_DOMAIN, "aws", "a1")
    under_old, under_new = issue_agent(old, spiffe), issue_agent(new, spiffe)
    crl = tmp_path / "crl.pem"
    crl.write_bytes(
        _pem(build_crl(old, [revoked_entry(under_old.cert.serial_number)], 3)) + _pem(build_crl(new, [], 1))
    )
    revocations = RevocationList.load(crl, ca)
    assert revocations.lookup(under_old.cert) is not None
    assert revocations.lookup(under_new.cert) is None
    # The same serial under the other CA is another certificate.
    clash = build_crl(new, [revoked_entry(under_new.cert.serial_number)], 2)
    crl.write_bytes(_pem(build_crl(old, [], 4)) + _pem(clash))
    later = RevocationList.load(crl, ca)
    assert later.lookup(under_old.cert) is None and later.lookup(under_new.cert) is not None
    revocations.check_successor(later)
    with pytest.raises(RevocationError, match="went back from 4 to 3"):
        later.check_successor(revocations)


def test_the_aggregator_config_refuses_a_missing_or_foreign_crl(pki: Pki, tmp_path: Path) -> None:
    base = aggregator_config(pki, tmp_path / "state")
    toml = tmp_path / "aggregator.toml"
    toml.write_text(f"""\
listen = "127.0.0.1:0"
state_dir = "{tmp_path / "state"}"
trust_domain = "{TRUST_DOMAIN}"
[tls]
cert = "{base.tls.cert}"
key = "{base.tls.key}"
ca = "{base.tls.ca}"
crl = "crl.pem"
[federation]
model_id = "tiny"
""")
    with pytest.raises(ConfigError, match=r"tls.crl: file not found: .*crl.pem"):
        load(AggregatorConfig, toml, env={}).validate()
    (tmp_path / "crl.pem").write_bytes(_pem(build_crl(create_ca("other"), [], 1)))
    with pytest.raises(ConfigError, match=r"tls.crl: .* is not signed by a CA in"):
        load(AggregatorConfig, toml, env={}).validate()
    (tmp_path / "crl.pem").write_bytes(_pem(build_crl(pki.dir.load_ca(), [], 1)))
    assert load(AggregatorConfig, toml, env={}).validate().tls.crl == tmp_path / "crl.pem"


# --- the aggregator enforcing it -----------------------------------------------------------------


class Crl:
    """A CRL file of the test CA, outside the shared PKI directory."""

    def __init__(self, pki: Pki, path: Path) -> None:
        self.ca, self.path, self.number = pki.dir.load_ca(), path, 0
        self.write([])

    def write(self, serials: list[int]) -> None:
        self.number += 1
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(_pem(build_crl(self.ca, [revoked_entry(s) for s in serials], self.number)))
        tmp.replace(self.path)


async def _watch_until_done(client) -> grpc.aio.AioRpcError | None:  # type: ignore[no-untyped-def]
    try:
        async for _ in client.watch_rounds():
            pass
    except grpc.aio.AioRpcError as exc:
        return exc
    return None


async def test_a_revoked_certificate_is_refused_and_its_live_calls_end(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """The CRL is re-read when its file changes: the revoked agent's open WatchRounds stream ends
    with UNAUTHENTICATED, its next call on the same connection is refused, the other agent carries
    on, a bad new CRL keeps the last good one, and a reissued certificate gets back in."""
    crl = Crl(pki, tmp_path / "crl.pem")
    config = aggregator_config(pki, tmp_path / "agg0", min_agents=3)  # where the fixture seeds
    tls = dataclasses.replace(config.tls, crl=crl.path, crl_poll_s=0.05)
    run = await start_aggregator(config=dataclasses.replace(config, tls=tls))
    mallory_files = run.pki.agent("mallory")
    async with run.client("mallory") as mallory, run.client("bob") as bob:
        await mallory.join(num_examples=1)
        await bob.join(num_examples=1)
        mallory_watch = asyncio.create_task(_watch_until_done(mallory))
        bob_watch = asyncio.create_task(_watch_until_done(bob))
        await asyncio.sleep(0.3)
        assert len(run.agg.access.live) == 2  # both streams are open
        ended_before = _metric("cloudfed_revoked_calls_total", cloud="aws", agent="mallory", when="ended")

        crl.write([_serial(mallory_files.cert)])
        err = await asyncio.wait_for(mallory_watch, 10)
        assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "the certificate of spiffe://test.cloudfed/cloud/aws/agent/mallory" in err.details()
        assert "was revoked at" in err.details() and err.details().endswith("; call ended")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mallory.join(num_examples=1)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "is revoked" in refused.value.details()
        assert _metric("cloudfed_revoked_calls_total", cloud="aws", agent="mallory", when="ended") == (
            ended_before + 1
        )
        assert not bob_watch.done()
        assert (await bob.join(num_examples=2)).agent_id.endswith("/agent/bob")
        assert _metric("cloudfed_crl_revoked_certificates") == 1

        # A CRL from another CA is refused; the last good list stays in force.
        failures = _metric("cloudfed_crl_reload_failures_total")
        crl.path.write_bytes(_pem(build_crl(create_ca("other"), [], 99)))
        await asyncio.sleep(0.5)
        assert _metric("cloudfed_crl_reload_failures_total") > failures
        assert run.agg.access.revocations is not None
        assert len(run.agg.access.revocations.current.entries) == 1
        with pytest.raises(grpc.aio.AioRpcError) as still:
            await mallory.join(num_examples=1)
        assert still.value.code() == grpc.StatusCode.UNAUTHENTICATED
        bob_watch.cancel()
        await asyncio.gather(bob_watch, return_exceptions=True)

    # The same identity with a new certificate (a new serial) is welcome again.
    async with run.client("mallory") as reissued:
        assert (await reissued.join(num_examples=1)).agent_id.endswith("/agent/mallory")


async def test_reload_takes_the_crl_at_once_and_an_older_crl_is_refused(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    crl = Crl(pki, tmp_path / "crl.pem")
    config = aggregator_config(pki, tmp_path / "agg0")
    tls = dataclasses.replace(config.tls, crl=crl.path, crl_poll_s=3600)
    run = await start_aggregator(config=dataclasses.replace(config, tls=tls))
    files = run.pki.agent("carol")
    async with run.client("carol") as carol:
        await carol.join(num_examples=1)
        newer = tmp_path / "newer.pem"
        shutil.copy(crl.path, newer)
        crl.write([_serial(files.cert)])
        run.agg.reload()  # what SIGHUP does; the poll would wait an hour
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await carol.join(num_examples=1)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Putting back the older CRL (number 1 < 2) does not un-revoke.
        newer.replace(crl.path)
        run.agg.reload()
        with pytest.raises(grpc.aio.AioRpcError):
            await carol.join(num_examples=1)


async def test_a_round_stops_waiting_for_a_participant_revoked_in_it(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """A plain round of 3 (2 uploads needed, deadline far away): 'early' uploads, then 'early' and
    'quitter' are revoked. 'quitter' is taken out of the round (declined, reason revoked) and the
    round completes as soon as 'last' uploads; 'early''s upload, taken before, stays in the sum."""
    crl = Crl(pki, tmp_path / "crl.pem")
    config = aggregator_config(pki, tmp_path / "agg0", min_agents=3, min_uploads=2, upload_deadline_s=300)
    run = await start_aggregator(
        config=dataclasses.replace(config, tls=dataclasses.replace(config.tls, crl=crl.path, crl_poll_s=3600))
    )
    numel = run.agg.rounds.layout.numel
    files = {n: run.pki.agent(n) for n in ("early", "quitter", "last")}
    clients = {n: AggregatorClient(run.target, f, server_name="localhost") for n, f in files.items()}
    joins = {n: await c.join(num_examples=10) for n, c in clients.items()}
    watchers = {n: Watcher(c) for n, c in clients.items()}
    digest = joins["early"].settings.layout.digest
    before = _metric("cloudfed_rounds_declined_total", cloud="aws", agent="quitter", reason="revoked")

    async def upload(name: str, event: pb.RoundEvent) -> None:
        payload = write_payload(tmp_path / f"{name}.bin", np.ones(numel, dtype=np.float32), 10.0)
        await clients[name].upload(payload, upload_header(event, digest, 10.0), new=True)

    try:
        event = await watchers["last"].until(pb.ROUND_PHASE_UPLOAD)
        began = time.monotonic()
        await upload("early", event)
        crl.write([_serial(files["early"].cert), _serial(files["quitter"].cert)])
        run.agg.reload()
        await asyncio.sleep(0.2)
        assert run.agg.rounds.db.participant_status(event.round_id)[joins["quitter"].agent_id] == "declined"
        await upload("last", event)
        done = await watchers["last"].until_version(1, timeout=60)
        assert done.phase == pb.ROUND_PHASE_COMPLETED
        assert time.monotonic() - began < 60
    finally:
        for w in watchers.values():
            await w.close()
        for c in clients.values():
            await c.close()
    assert sorted(run.agg.rounds.store.manifest(1).participants) == sorted(
        joins[n].agent_id for n in ("early", "last")
    )
    status = run.agg.rounds.db.participant_status(1)
    assert sorted(status.values()) == ["declined", "uploaded", "uploaded"]
    assert (
        _metric("cloudfed_rounds_declined_total", cloud="aws", agent="quitter", reason="revoked")
        == before + 1
    )


async def test_status_shows_each_agents_certificate_end_and_revocation(
    start_aggregator, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cloudfed-aggregator status`` reads the certificate each agent last joined with from the
    database and checks it against the configured CRL."""
    from server.cli import status

    crl = Crl(pki, tmp_path / "crl.pem")
    config = aggregator_config(pki, tmp_path / "agg0")
    config = dataclasses.replace(config, tls=dataclasses.replace(config.tls, crl=crl.path, crl_poll_s=3600))
    run = await start_aggregator(config=config)
    for name in ("alice", "bob"):
        async with run.client(name) as client:
            await client.join(num_examples=3)
    bob = x509.load_pem_x509_certificate(pki.dir.cert("aws-bob-test_cloudfed").read_bytes())
    crl.write([bob.serial_number])
    assert status(config) == 0
    out = capsys.readouterr().out.splitlines()
    lines = {out[i].split()[0]: out[i + 1].strip() for i, line in enumerate(out) if "examples 3" in line}
    alice = lines[f"spiffe://{TRUST_DOMAIN}/cloud/aws/agent/alice"]
    assert alice.startswith("certificate ") and re.search(
        r"ends \d{4}-\d\d-\d\d \d\d:\d\d UTC \((89|90) days left\)$", alice
    )
    revoked = lines[f"spiffe://{TRUST_DOMAIN}/cloud/aws/agent/bob"]
    assert f"certificate {bob.serial_number:x}"[:28] in revoked
    assert "; REVOKED: serial" in revoked and "was revoked at" in revoked


# --- the real daemons ----------------------------------------------------------------------------


@pytest.mark.slow
def test_revoking_an_agent_mid_round_takes_it_out_and_the_federation_goes_on(tmp_path: Path) -> None:
    """Real aggregator and three agent daemons (masked, demo layout, two agents enough). Mid-round,
    the operator revokes gcp's certificate with cloudfed-pki and sends SIGHUP: the round no longer
    waits for gcp (it is declined as revoked, though the upload deadline is 300 s), gcp's daemon stops
    with the reason, its preflight check is refused, and the other two carry on."""

    fed = Federation(tmp_path, edit_aggregator=lambda t: t.replace("min_agents = 3", "min_agents = 2"))
    try:
        fed.start_aggregator()
        fed.start_agents()
        wait_until("version 1", lambda: 1 in fed.versions(), timeout=240)
        gcp_uri = f"spiffe://{DEMO_DOMAIN}/cloud/gcp/agent/agent-1"
        opened = wait_until(  # all three in it: with two agents enough to start, a late one may miss it
            "a round of all three agents with gcp yet to upload, after version 1",
            lambda: query(
                fed.db,
                "SELECT r.round_id FROM rounds r JOIN participants p USING (round_id)"
                " WHERE r.ended_at IS NULL AND r.round_id >= 2 AND p.agent = ? AND p.status != 'uploaded'"
                " AND (SELECT COUNT(*) FROM participants q WHERE q.round_id = r.round_id) = 3",
                gcp_uri,
            ),
            timeout=240,
            every=0.01,
        )
        round_id = opened[0][0]  # type: ignore[index]
        gcp = fed.agents["gcp"]
        gcp.send_signal(signal.SIGSTOP)  # it cannot upload before the revocation lands
        revoke = run_cli(
            "common.pki_cli",
            "--dir",
            str(tmp_path / "pki"),
            "revoke",
            "gcp-agent-1",
            "--reason",
            "key_compromise",
        )
        assert revoke.returncode == 0, revoke.stderr
        assert fed.aggregator is not None
        fed.aggregator.send_signal(signal.SIGHUP)
        ended = wait_until(
            f"round {round_id} to end without gcp",
            lambda: query(
                fed.db,
                "SELECT phase, new_version FROM rounds WHERE round_id = ? AND ended_at IS NOT NULL",
                round_id,
            ),
            timeout=120,
        )
        gcp.send_signal(signal.SIGCONT)
        assert ended[0][0] == "COMPLETED"  # type: ignore[index]
        statuses = dict(query(fed.db, "SELECT agent, status FROM participants WHERE round_id = ?", round_id))
        assert statuses[gcp_uri] == "declined", statuses
        assert sorted(s for a, s in statuses.items() if a != gcp_uri) == ["uploaded", "uploaded"]
        assert gcp.wait(60) == 1
        log = (tmp_path / "gcp-agent-1" / "agent.log").read_text()
        assert "UNAUTHENTICATED" in log and "revoked" in log and "keyCompromise" in log
        check = run_cli("agent.cli", "--config", str(tmp_path / "gcp-agent-1" / "agent.toml"), "check")
        assert check.returncode == 1
        assert "aggregator said UNAUTHENTICATED: the certificate of" in check.stderr
        assert "is revoked" in check.stderr
        # The others carry on, and gcp is in no later round.
        target = ended[0][1] + 1  # type: ignore[index]
        wait_until(f"version {target}", lambda: target in fed.versions(), timeout=180)
        later = query(
            fed.db, "SELECT COUNT(*) FROM participants WHERE round_id > ? AND agent = ?", round_id, gcp_uri
        )
        assert later == [(0,)]
        assert all(p.poll() is None for c, p in fed.agents.items() if c != "gcp")
    finally:
        fed.stop_all()


# --- agents fetching it from the aggregator ------------------------------------------------------


async def test_the_aggregator_serves_the_crl_it_enforces_and_agents_keep_the_newest(
    start_aggregator, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GetRevocationList returns the CRL file the aggregator took, a reload's newer one after it;
    an agent verifies it, keeps it in its state dir, and checks rosters against the newest list
    it has seen: an older one served later (an aggregator rolling back) is not taken, and one
    signed by another CA is a roster error. An aggregator with no CRL answers NOT_FOUND."""
    crl = Crl(pki, tmp_path / "crl.pem")
    config = aggregator_config(pki, tmp_path / "agg0")
    tls = dataclasses.replace(config.tls, crl=crl.path, crl_poll_s=3600)
    run = await start_aggregator(config=dataclasses.replace(config, tls=tls))
    mallory = _serial(run.pki.agent("mallory").cert)
    agent_tls = AgentTlsConfig(ca=pki.dir.ca_cert)
    revocations = AgentRevocations(tmp_path / "agent-state", agent_tls)
    assert revocations.for_round(None) is None  # no source: nothing to check against
    async with run.client("carol") as carol:
        first = await carol.revocation_list()
        assert first == crl.path.read_bytes()
        checked = revocations.for_round(first)
        assert (
            checked is not None
            and checked.lookup_serial(pki.dir.load_ca().cert.subject.public_bytes(), mallory) is None
        )

        crl.write([mallory])
        run.agg.reload()
        newer = await carol.revocation_list()
        assert newer == crl.path.read_bytes() != first
        checked = revocations.for_round(newer)
        issuer = pki.dir.load_ca().cert.subject.public_bytes()
        assert checked is not None and checked.lookup_serial(issuer, mallory) is not None
        assert revocations.kept.read_bytes() == newer
        assert describe_revocations(checked, True).startswith(
            "1 certificate(s) revoked (newest of the aggregator's"
        )

        with caplog.at_level(logging.WARNING, logger="agent.revocations"):
            rolled_back = revocations.for_round(first)  # what a rolling-back aggregator would serve
        assert rolled_back is not None and rolled_back.lookup_serial(issuer, mallory) is not None
        assert "older than one this agent has seen" in caplog.text
        assert revocations.kept.read_bytes() == newer

        with pytest.raises(RosterError, match="the aggregator's CRL does not verify"):
            revocations.for_round(_pem(build_crl(create_ca("other"), [], 7)))

    plain = await start_aggregator(config=aggregator_config(pki, tmp_path / "agg1"))
    async with plain.client("carol") as carol:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await carol.stub.GetRevocationList(pb.GetRevocationListRequest())
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert await carol.revocation_list() is None


def test_a_list_merged_from_several_sources_takes_each_issuers_newest(pki: Pki, tmp_path: Path) -> None:
    """The agent's tls.crl and the served list: per issuer, the higher CRL number wins, whichever
    source it comes from; a CA only one source knows keeps its entries."""
    ca, other = pki.dir.load_ca(), create_ca("rotated-in")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.dir.ca_cert.read_bytes() + other.cert.public_bytes(serialization.Encoding.PEM))
    cas = bundle.read_bytes()

    def parsed(*crls: x509.CertificateRevocationList) -> RevocationList:
        return RevocationList.parse(b"".join(_pem(c) for c in crls), cas, "test", str(bundle))

    old = parsed(build_crl(ca, [revoked_entry(1)], 1))
    new = parsed(build_crl(ca, [revoked_entry(2)], 2), build_crl(other, [revoked_entry(9)], 1))
    issuer, other_issuer = ca.cert.subject.public_bytes(), other.cert.subject.public_bytes()
    for merged in (old.merged(new), new.merged(old)):
        assert merged.lookup_serial(issuer, 2) is not None and merged.lookup_serial(issuer, 1) is None
        assert merged.lookup_serial(other_issuer, 9) is not None
        assert merged.numbers == {issuer: 2, other_issuer: 1}

    local = tmp_path / "local.pem"
    local.write_bytes(_pem(build_crl(ca, [revoked_entry(3)], 5)))  # the agent's own file is newer
    revocations = AgentRevocations(tmp_path / "state", AgentTlsConfig(ca=bundle, crl=local))
    checked = revocations.for_round(_pem(build_crl(ca, [revoked_entry(2)], 2)))
    assert checked is not None and checked.lookup_serial(issuer, 3) and not checked.lookup_serial(issuer, 2)
    local.write_bytes(b"not a crl")
    with pytest.raises(RosterError, match=r"cannot check peers' certificates against tls\.crl"):
        revocations.for_round(None)
