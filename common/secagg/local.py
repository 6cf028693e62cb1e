"""A whole secure-aggregation round in one process, with dropouts at any phase (tests, benchmarks)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.identity import SpiffeId
from common.pki import Issued, create_ca, issue_agent
from common.secagg.agent import AgentRound
from common.secagg.keys import Advertisement
from common.secagg.params import SecAggParams
from common.secagg.server import ServerRound

PHASES = ("advertise", "share", "upload", "unmask")


@dataclass
class Federation:
    """A CA and ``n`` agent certificates in one trust domain."""

    ca: Issued
    agents: dict[str, Issued]

    @classmethod
    def create(cls, n: int, trust_domain: str = "secagg.test") -> Federation:
        """Fresh CA and agents ``spiffe://<td>/cloud/c<i>/agent/a<i>``."""
        ca = create_ca("secagg test CA")
        agents = {}
        for i in range(n):
            spiffe = SpiffeId(trust_domain, f"c{i:02d}", f"a{i:02d}")
            agents[spiffe.uri] = issue_agent(ca, spiffe)
        return cls(ca, agents)

    def agent_round(self, agent_id: str, round_id: int, params: SecAggParams, seed: bytes) -> AgentRound:
        """A fresh protocol state for one agent."""
        issued = self.agents[agent_id]
        return AgentRound(round_id, agent_id, params, (self.ca.cert,), issued.cert_pem(), issued.key, seed)


@dataclass
class RoundResult:
    """The unmasked ring sum and who ended up in it."""

    total: np.ndarray
    survivors: list[str]
    dropped: list[str]
    agents: dict[str, AgentRound] = field(default_factory=dict)
    keys: dict[str, SentKeys] = field(default_factory=dict)
    """What each agent sent for keys (``agent.uplink.secagg_key_bytes`` sizes it on the wire)."""
    roster: list[str] = field(default_factory=list)
    """Agent ids in roster order (how shares name their peers on the wire)."""
    upload_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of each agent's masked update on the wire (``params.ring_bits`` an element)."""
    server: ServerRound | None = None
    """The aggregator's state (with coverage, ``covered_mean`` decodes the sum)."""


@dataclass
class SentKeys:
    """One agent's key traffic in a round: its advertisement, sealed shares and revealed shares."""

    advertisement: Advertisement
    sealed: dict[str, bytes] = field(default_factory=dict)
    reveals: dict[str, tuple[int, bytes]] = field(default_factory=dict)


Codes = np.ndarray | Callable[[AgentRound], np.ndarray]
"""An agent's encoded update, or how to encode it once its shares arrived (its dithers need them)."""


def run_round(
    federation: Federation,
    codes: Mapping[str, Codes],
    params: SecAggParams,
    drop: Mapping[str, set[str]] | None = None,
    round_id: int = 1,
    seed: bytes = b"public-round-seed",
    tamper: Callable[[list[Advertisement]], None] | None = None,
    length: int = 0,
) -> RoundResult:
    """Run advertise -> share -> masked upload -> unmask; ``drop[phase]`` agents vanish after that phase
    (``advertise``: advertised then gone; ``share``: shared then gone; ``upload``: vanished mid-way
    through sending; ``unmask``: uploaded but never answered). ``length``: elements an update
    (default: the first array's)."""
    drop = drop or {}
    length = length or len(next(c for c in codes.values() if isinstance(c, np.ndarray)))
    server = ServerRound(round_id, params, length, seed)
    agents = {a: federation.agent_round(a, round_id, params, seed) for a in codes}
    keys = {}
    for a, agent in agents.items():
        adv = agent.advertise()
        keys[a] = SentKeys(adv)
        server.add_advertisement(adv)
    roster = server.roster()
    if tamper is not None:
        tamper(roster)
    alive = [a for a in agents if a not in drop.get("advertise", set())]
    for a in alive:
        sealed = agents[a].share_keys(roster)
        keys[a].sealed = sealed
        server.add_shares(a, sealed)
    alive = [a for a in alive if a not in drop.get("share", set())]
    server.start_sum()
    fp, upload_bytes = params.fixed_point, {}
    for a in alive:
        agents[a].receive_shares(server.shares_for(a))
        mine = codes[a]
        encoded = mine.copy() if isinstance(mine, np.ndarray) else mine(agents[a])
        upload = agents[a].mask_codes(encoded)
        wire = fp.to_wire(upload)
        upload_bytes[a] = len(wire)
        if a in drop.get("upload", set()):
            continue  # a partial upload never reaches the sum (the spool holds it until complete)
        server.add_masked(a, fp.from_wire(wire, upload.size))
        server.finish_upload(a)
    survivors, dropped = server.unmask_request()
    for a in survivors:
        if a in drop.get("unmask", set()):
            continue
        revealed = agents[a].unmask(survivors, dropped)
        keys[a].reveals = revealed
        server.add_reveal(a, revealed)
    total = server.unmasked_sum().copy()
    ids = [adv.agent_id for adv in roster]
    return RoundResult(total, survivors, dropped, agents, keys, ids, upload_bytes, server)


def now() -> dt.datetime:
    """UTC now (for verifying certificates)."""
    return dt.datetime.now(dt.UTC)


def ids_of(federation: Federation) -> Sequence[str]:
    """Agent ids in a stable order."""
    return sorted(federation.agents)
