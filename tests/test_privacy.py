"""The agent's privacy policy: what it refuses at Join (the daemon sends nothing and exits), what
the aggregator refuses at Join, the config that states it, and the threshold for colluders."""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
from pathlib import Path

import grpc
import pytest

from agent.daemon import Agent
from agent.demo import prepare
from agent.privacy import announced, check_federation, describe
from common.config import AgentConfig, AgentTlsConfig, DpConfig, PrivacyConfig, SecAggConfig, load
from common.errors import ConfigError, FailedPrecondition, PolicyRefused
from common.secagg.graph import check_parameters
from protos.cloudfed.v1 import federation_pb2 as pb
from server import admission
from server.admission import check_agent_policy
from server.cli import status
from server.invitations import AgentInfo, Invitation, invite
from server.rounds import auto_threshold
from tests.conftest import Pki, aggregator_config
from tests.daemons import start, stop, wait_serving
from tests.test_metrics import scrape, value


def settings(enabled: bool, coverage: int = 0) -> pb.FederationSettings:
    return pb.FederationSettings(
        federation_id="fed", secagg=pb.SecAggSettings(enabled=enabled, coverage=coverage)
    )


def test_masking_is_required_unless_the_operator_trusts_the_aggregator() -> None:
    with pytest.raises(
        PolicyRefused, match=r"'fed' runs without secure aggregation.*privacy\.require_masking"
    ):
        check_federation(PrivacyConfig(), settings(False))
    check_federation(PrivacyConfig(require_masking=False), settings(False))
    check_federation(PrivacyConfig(), settings(True))
    assert "each agent's update" in describe(PrivacyConfig(), settings(False))
    assert "REFUSED" in describe(PrivacyConfig(), settings(False))
    assert describe(PrivacyConfig(), settings(True)).endswith("allowed by this agent's policy")


def test_coverage_below_the_smallest_sum_allowed_is_refused() -> None:
    """Sparse coverage (README, Secure aggregation) lets the aggregator learn each element's sum
    over k agents: each agent's operator decides whether k is enough."""
    covered = settings(True, coverage=2)
    check_federation(PrivacyConfig(), covered)  # the protocol's own floor is 2
    strict = PrivacyConfig(min_agents_per_sum=3)
    with pytest.raises(PolicyRefused, match=r"over 2 agents .*privacy\.min_agents_per_sum \(3\)"):
        check_federation(strict, covered)
    check_federation(strict, settings(True, coverage=3))
    check_federation(strict, settings(True))  # full sums: survivors are checked at unmask
    assert "each element's sum over 2 agents; REFUSED" in describe(strict, covered)


def test_privacy_config_is_loaded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("[privacy]\nmin_agents_per_sum = 4\ncolluders = 1\n")
    loaded = load(AgentConfig, path, env={"CLOUDFED_AGENT_PRIVACY_REQUIRE_MASKING": "false"})
    assert loaded.privacy == PrivacyConfig(require_masking=False, min_agents_per_sum=4, colluders=1)
    assert loaded.privacy.validate() is loaded.privacy
    assert load(AgentConfig, None, env={}).privacy == PrivacyConfig(True, 2, 0)  # private by default
    with pytest.raises(ConfigError, match=r"privacy\.min_agents_per_sum must be at least 2"):
        PrivacyConfig(min_agents_per_sum=1).validate()
    with pytest.raises(
        ConfigError, match=r"privacy\.colluders must be in 0\.\.privacy\.min_agents_per_sum - 2 \(1\)"
    ):
        PrivacyConfig(min_agents_per_sum=3, colluders=2).validate()
    with pytest.raises(ConfigError, match=r"privacy\.colluders"):
        dataclasses.replace(load(AgentConfig, None, env={}), privacy=PrivacyConfig(colluders=-1)).validate()


@pytest.mark.parametrize(
    ("agents", "neighbours", "colluders", "expected"),
    [(4, 0, 0, 3), (5, 0, 0, 3), (5, 0, 1, 4), (4, 0, 1, 3), (10, 4, 0, 3), (10, 4, 1, 4), (7, 0, 3, 6)],
)
def test_auto_threshold_is_the_least_safe_against_the_colluders(
    agents: int, neighbours: int, colluders: int, expected: int
) -> None:
    t = auto_threshold(agents, neighbours, colluders)
    assert t == expected
    check_parameters(agents, neighbours, t, colluders)
    with pytest.raises(ConfigError, match="must be more than half"):
        check_parameters(agents, neighbours, t - 1, colluders)


def wary_agent(run, pki: Pki, tmp_path: Path) -> Agent:  # type: ignore[no-untyped-def]
    """The real agent daemon, with private data, requiring masking and naming 1 colluder."""
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"private document {i} of this cloud" for i in range(40)))
    files = pki.agent("strict")
    config = AgentConfig(
        aggregator=run.target,
        server_name="localhost",
        state_dir=tmp_path / "agent-state",
        data=data,
        metrics_listen="",
        tls=AgentTlsConfig(files.cert, files.key, files.ca),
        privacy=PrivacyConfig(min_agents_per_sum=3, colluders=1),
    ).validate()
    return Agent(config)


async def test_aggregator_refuses_at_join_an_agent_whose_policy_it_can_never_meet(
    start_aggregator, pki: Pki, tmp_path: Path
) -> None:
    """The agent announces its policy at Join; an aggregator without secure aggregation refuses it
    with FAILED_PRECONDITION and the reason (in its log too), records no such agent, and the
    daemon stops before loading a model."""
    run = await start_aggregator(min_agents=1)
    agent = wary_agent(run, pki, tmp_path)
    with pytest.raises(FailedPrecondition, match=r"refused to let us join: .*privacy\.require_masking"):
        await asyncio.wait_for(agent.run(asyncio.Event()), 60)
    assert agent.worker.trainer is None and agent.progress.rounds_trained == set()
    assert run.agg.rounds.agents == {}


async def test_agent_daemon_refuses_an_aggregator_that_ignores_its_policy(
    start_aggregator, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent does not rely on the aggregator's check: against one that skips it (as a
    malicious or older one would), the daemon joins, reads the settings, refuses, and leaves
    before loading a model or training; no upload reaches the aggregator."""
    monkeypatch.setattr(admission, "check_agent_policy", lambda announced, config: None)
    run = await start_aggregator(min_agents=1)
    agent = wary_agent(run, pki, tmp_path)
    with pytest.raises(PolicyRefused, match="runs without secure aggregation"):
        await asyncio.wait_for(agent.run(asyncio.Event()), 60)
    assert agent.worker.trainer is None and agent.progress.rounds_trained == set()
    assert not any(run.agg.rounds.spool.root.rglob("*.bin"))
    (joined,) = run.agg.rounds.agents.values()  # it joined, announcing its policy
    assert joined.colluders == 1


@pytest.mark.parametrize(
    ("secagg", "policy", "message"),
    [
        (SecAggConfig(), pb.PrivacyPolicy(require_masking=True), "runs without secure aggregation"),
        (SecAggConfig(), pb.PrivacyPolicy(require_masking=False), ""),
        (SecAggConfig(enabled=True, coverage=2), pb.PrivacyPolicy(min_agents_per_sum=3), r"over 2 agents"),
        (SecAggConfig(enabled=True, coverage=3), pb.PrivacyPolicy(min_agents_per_sum=3), ""),
        (SecAggConfig(enabled=True, threshold=3), pb.PrivacyPolicy(colluders=1), r"below the 4 that 5 share"),
        (SecAggConfig(enabled=True, threshold=4), pb.PrivacyPolicy(colluders=1), ""),
        (SecAggConfig(enabled=True, threshold=3, neighbours=4), pb.PrivacyPolicy(colluders=1), "below the 4"),
        (SecAggConfig(enabled=True), pb.PrivacyPolicy(colluders=3, min_agents_per_sum=5), ""),  # auto: adapts
        (SecAggConfig(enabled=True), pb.PrivacyPolicy(min_agents_per_sum=6), r"max_agents = 5"),
        (SecAggConfig(enabled=True), pb.PrivacyPolicy(colluders=4, min_agents_per_sum=5), "more agents"),
    ],
)
def test_aggregator_admission_names_the_setting_that_breaks_a_policy(
    pki: Pki, tmp_path: Path, secagg: SecAggConfig, policy: pb.PrivacyPolicy, message: str
) -> None:
    base = aggregator_config(pki, tmp_path, min_agents=5, max_agents=5)
    config = dataclasses.replace(base, secagg=secagg)
    if message:
        with pytest.raises(PolicyRefused, match=message):
            check_agent_policy(policy, config)
    else:
        check_agent_policy(policy, config)


def test_secagg_config_colluders_default_is_the_old_threshold(pki: Pki, tmp_path: Path) -> None:
    """colluders = 0 keeps the thresholds of before; a deployment sets it to guard against more."""
    assert SecAggConfig().colluders == 0
    base = aggregator_config(pki, tmp_path, min_agents=4)
    dataclasses.replace(base, secagg=SecAggConfig(enabled=True, colluders=2)).validate()
    assert [auto_threshold(n, 0) for n in (2, 3, 4, 5, 6)] == [2, 2, 3, 3, 4]


def test_round_invites_only_agents_whose_policy_it_meets() -> None:
    """An agent whose colluders the share holders cannot outvote, or whose smallest sum is more
    agents than the round has, is left out with why (it would refuse the round, and be waited
    for); leaving one out shrinks the round, which can leave out another; a left-out agent's
    place goes to the next connected one."""
    agents = {f"a{i}": AgentInfo(10, "test") for i in range(6)}
    names = sorted(agents)
    assert invite(names, 5, agents, 0) == Invitation(frozenset(names[:5]), {})
    agents["a1"] = AgentInfo(10, "test", colluders=2)  # t = (5 + 2) // 2 + 1 = 4 <= 5 holders
    assert invite(names, 5, agents, 0).invited == frozenset(names[:5])
    assert auto_threshold(5, 0, 2) == 4
    agents["a2"] = AgentInfo(10, "test", colluders=5)  # 5 holders cannot outvote 5 colluders
    invitation = invite(names, 5, agents, 0)
    assert invitation.invited == frozenset(names) - {"a2"}  # a5 takes its place
    assert "privacy.colluders (5) needs a threshold of 6" in invitation.left_out["a2"]
    agents["a3"] = AgentInfo(10, "test", min_agents_per_sum=5)
    invitation = invite(names, 5, agents, 0)
    assert invitation.invited == frozenset(names) - {"a2"}
    agents["a4"] = AgentInfo(10, "test", min_agents_per_sum=5)
    agents["a5"] = AgentInfo(10, "test", colluders=1)
    agents["a0"] = AgentInfo(10, "test", min_agents_per_sum=5)
    # A fixed t = 3 is no majority of 5 holders and a1's 2 colluders: a1 and a2 are out; of the 4
    # left, a0, a3 and a4 want sums over 5; a5 (1 colluder) is left alone, a round the
    # coordinator abandons at once as too small.
    invitation = invite(names, 5, agents, 0, threshold=3)
    assert set(invitation.left_out) == {"a0", "a1", "a2", "a3", "a4"}
    assert "needs a threshold of 4, and 5 share holders allow at most 3" in invitation.left_out["a1"]
    assert "min_agents_per_sum (5) is more than the 4 agents" in invitation.left_out["a0"]
    assert invitation.invited == frozenset({"a5"})
    # with 2 neighbours each agent's shares sit with 3 holders: 2 colluders are still outvoted
    plain = {f"b{i}": AgentInfo(10, "test", colluders=2 if i == 0 else 0) for i in range(6)}
    assert invite(sorted(plain), 6, plain, 2).invited == frozenset(plain)
    plain["b0"] = AgentInfo(10, "test", colluders=3)
    assert set(invite(sorted(plain), 6, plain, 2).left_out) == {"b0"}


def test_agent_sits_out_a_round_its_policy_refuses_and_counts_it(tmp_path: Path) -> None:
    """The real daemons: 3 agents with masking, one of which lets the aggregator learn no sum over
    fewer than 4 agents. The aggregator, told so at Join, does not invite it to a 3-agent round
    and says why in its round events; the agent logs that and counts the round in
    cloudfed_agent_rounds_sat_out_total{reason="privacy_policy"}; the other two complete the round
    without it, and its audit dir shows it sent no update."""
    agg_config, agent_configs, health = prepare(tmp_path, rounds=1)
    wary, *others = agent_configs
    text = wary.read_text().replace("max_rounds = 1", "max_rounds = 0")  # stays up to be scraped
    wary.write_text(text.replace("require_masking = true", "require_masking = true\nmin_agents_per_sum = 4"))
    listen = tomllib.loads(wary.read_text())["metrics_listen"]
    quick = {"CLOUDFED_ROUNDS_MIN_UPLOADS": "2", "CLOUDFED_SECAGG_KEY_DEADLINE_S": "3"}
    procs = [start("server.cli", "--config", str(agg_config), log=tmp_path / "aggregator.log", env=quick)]
    try:
        wait_serving(health, timeout=120)
        procs += [
            start("agent.cli", "--config", str(c), "run", log=c.parent / "agent.log") for c in agent_configs
        ]
        for proc in procs[2:]:  # the others stop after evaluating the round's new version
            assert proc.wait(240) == 0
        samples = scrape(listen)
    finally:
        for proc in procs:
            stop(proc)
    assert value(samples, "cloudfed_agent_rounds_sat_out_total", reason="privacy_policy") >= 1
    assert value(samples, "cloudfed_agent_rounds_total") == 0
    log = (wary.parent / "agent.log").read_text()
    assert "not invited: its privacy.min_agents_per_sum (4) is more than the 3 agents" in log
    assert not list((wary.parent / "audit").glob("*.safetensors"))
    assert all(len(list((c.parent / "audit").glob("*.safetensors"))) == 1 for c in others)


async def test_the_dp_guarantee_an_agent_announces_is_kept_for_the_operators(
    start_aggregator, capsys: pytest.CaptureFixture[str]
) -> None:
    """An agent announces the DP guarantee it trains under at Join; the aggregator keeps it in
    SQLite and `status` shows it per agent. One announcing a policy without DP is shown as such,
    and an announcement that makes no sense is refused with INVALID_ARGUMENT, changing nothing."""
    run = await start_aggregator(min_agents=3)
    users = pb.DifferentialPrivacy(unit="user", max_epsilon=8.0, delta=1e-6, epsilon_spent=1.25)
    async with run.client("a1") as client:
        await client.join(10, privacy=pb.PrivacyPolicy(require_masking=False, differential_privacy=users))
        for bad in (
            pb.DifferentialPrivacy(unit="customer", max_epsilon=8.0, delta=1e-6),
            pb.DifferentialPrivacy(unit="record", max_epsilon=8.0, delta=0.0),
            pb.DifferentialPrivacy(unit="record", max_epsilon=float("inf"), delta=1e-6),
            pb.DifferentialPrivacy(unit="record", max_epsilon=8.0, delta=1e-6, epsilon_spent=float("nan")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.join(
                    10, privacy=pb.PrivacyPolicy(require_masking=False, differential_privacy=bad)
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "privacy.differential_privacy" in (refused.value.details() or "")
    async with run.client("a2") as client:
        await client.join(10, privacy=pb.PrivacyPolicy(require_masking=False))
    assert status(run.agg.config) == 0
    out = capsys.readouterr().out
    assert "/a1  examples 10 (noised: its DP covers it), joined" in out  # its FedAvg weight
    assert "/a2  examples 10, joined" in out
    shown = [line.strip() for line in out.splitlines() if "differential privacy:" in line]
    assert shown == [
        "differential privacy: user-level DP-SGD, epsilon 1.250 of 8 spent at its last Join (delta 1e-06)",
        "differential privacy: none: this agent's updates are not differentially private",
    ], out


def test_the_agent_announces_its_dp_guarantee_only_when_it_trains_with_dp() -> None:
    assert not announced(PrivacyConfig()).HasField("differential_privacy")
    dp = DpConfig(enabled=True, noise_multiplier=1.0, unit="user", max_epsilon=4.0, delta=1e-7)
    got = announced(PrivacyConfig(dp=dp), epsilon_spent=0.5).differential_privacy
    assert (got.unit, got.max_epsilon, got.delta, got.epsilon_spent) == ("user", 4.0, 1e-7, 0.5)
