"""The aggregator's durable state in SQLite (WAL): agents, rounds, participants, versions, evals.

Global versions themselves are safetensors checkpoints (server/checkpoints.py);
a version is committed once its manifest exists, and only then recorded here.
On restart, rounds that were in flight are marked interrupted: a crash loses
at most the round in flight and never half-applies one.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography import x509

from common.revocation import RevocationList, Revoked
from server.version_ranking import AgentEval

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent TEXT PRIMARY KEY, cloud TEXT NOT NULL, software_version TEXT, num_examples INTEGER,
    joined_at REAL NOT NULL, last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, phase TEXT NOT NULL,
    started_at REAL NOT NULL, deadline REAL, ended_at REAL, new_version INTEGER, reason TEXT
);
CREATE TABLE IF NOT EXISTS participants (
    round_id INTEGER NOT NULL REFERENCES rounds(round_id), agent TEXT NOT NULL,
    status TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0, weight REAL, updated_at REAL NOT NULL,
    PRIMARY KEY (round_id, agent)
);
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, parent INTEGER, round_id INTEGER, created_at REAL NOT NULL,
    sha256 TEXT NOT NULL, participants INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (
    agent TEXT NOT NULL, version INTEGER NOT NULL, eval_loss REAL NOT NULL, tokens INTEGER,
    reported_at REAL NOT NULL, PRIMARY KEY (agent, version)
);
"""
ADDED_COLUMNS = {
    "agents": {
        "cert_serial": "TEXT",
        "cert_issuer": "BLOB",
        "cert_not_after": "REAL",
        "differential_privacy": "TEXT",
        "eval_withheld_version": "INTEGER",
        "eval_withheld_words": "TEXT",
        "eval_withheld_reason": "TEXT",
    },
    "evals": {"loss_stddev": "REAL NOT NULL DEFAULT 0"},
}
"""Columns added since the first release (to databases made before they existed): the certificate
an agent last joined with, the DP guarantee it announced and the last eval loss it withheld, with
why (in its words, and the metrics' reason label); the deviation of an eval loss's DP noise."""
RENAMED_COLUMNS = (
    ("agents", "eval_withheld_reason", "eval_withheld_words"),
    ("agents", "eval_withheld_why", "eval_withheld_reason"),
)
"""Columns renamed since they were added, in order (old, new): a withheld eval's words were kept
as ``eval_withheld_reason`` and its reason label as ``eval_withheld_why``. Each rename applies
where the old column exists and the new one does not yet."""
OPEN_PHASES = ("ADVERTISE_KEYS", "SHARE_KEYS", "UPLOAD", "UNMASK", "AGGREGATE")
_SELECT_OPEN = "SELECT round_id FROM rounds WHERE phase IN (?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class RoundRow:
    """One row of the rounds table."""

    round_id: int
    base_version: int
    phase: str
    started_at: float
    ended_at: float | None
    new_version: int | None
    reason: str | None
    participants: int
    uploaded: int
    uploaded_bytes: int = 0
    """Payload bytes of the uploads received (masked or encoded, as sent)."""


@dataclass(frozen=True)
class AgentCertificate:
    """What the aggregator keeps of the certificate an agent joined with."""

    serial_hex: str
    issuer_der: bytes
    not_after: float | None
    """Unix time the certificate ends; None for a Join recorded before this was kept."""

    @classmethod
    def of(cls, cert: x509.Certificate) -> AgentCertificate:
        """From a parsed certificate."""
        return cls(
            f"{cert.serial_number:x}", cert.issuer.public_bytes(), cert.not_valid_after_utc.timestamp()
        )

    def revocation(self, revocations: RevocationList) -> Revoked | None:
        """Its entry in ``revocations``, or None."""
        if not self.serial_hex:
            return None
        return revocations.lookup_serial(self.issuer_der, int(self.serial_hex, 16))


class WithheldEval(NamedTuple):
    """An eval loss an agent withheld: of which version, why (the metrics' reason label) and in
    its words."""

    version: int
    reason: str
    words: str


@dataclass(frozen=True)
class AgentRow:
    """One row of the agents table."""

    agent: str
    last_seen: float
    num_examples: int
    certificate: AgentCertificate
    differential_privacy: str = ""
    """The DP guarantee it announced at its last Join, in words ('' if it announced no policy)."""
    withheld: WithheldEval | None = None
    """The last version whose eval loss it withheld, and why (None: none withheld)."""


class StateDB:
    """Small synchronous SQLite store; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a recorded version or outcome survives power loss
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _migrate(self) -> None:
        """Bring a database of an older release up to this schema, in one transaction: columns
        renamed (``RENAMED_COLUMNS``), then the missing ones added; nothing is dropped."""
        with self._transaction():
            for table, old, new in RENAMED_COLUMNS:
                have = self._columns(table)
                if old in have and new not in have:
                    self._db.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
            for table, columns in ADDED_COLUMNS.items():
                have = self._columns(table)
                for name, kind in columns.items():
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        """Close the connection."""
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Statements that commit together. The connection autocommits each statement otherwise
        (isolation_level=None), so ``with self._db`` alone would not make them atomic: a reader
        (or a crash) could see a round ended without its dropped participants."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _tx(self, sql: str, *args: object) -> None:
        with self._transaction():
            self._db.execute(sql, args)

    def recover(self) -> list[int]:
        """Mark rounds left open by a crash as interrupted; return their ids."""
        open_ids = [r[0] for r in self._db.execute(_SELECT_OPEN, OPEN_PHASES)]
        with self._transaction():
            for round_id in open_ids:
                self._db.execute(
                    "UPDATE rounds SET phase='ABANDONED', ended_at=?, reason=? WHERE round_id=?",
                    (time.time(), "interrupted: the aggregator restarted during the round", round_id),
                )
        return open_ids

    def last_round_id(self) -> int:
        """Highest round id ever started (0 if none)."""
        row = self._db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return int(row[0] or 0)

    def agent_joined(
        self,
        agent: str,
        cloud: str,
        software_version: str,
        num_examples: int,
        certificate: AgentCertificate | None = None,
        differential_privacy: str = "",
    ) -> None:
        """Record a Join (the certificate it came with and the DP guarantee it announced)."""
        now = time.time()
        cert = certificate or AgentCertificate("", b"", None)
        self._tx(
            "INSERT INTO agents (agent, cloud, software_version, num_examples, joined_at, last_seen,"
            " cert_serial, cert_issuer, cert_not_after, differential_privacy)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(agent) DO UPDATE SET software_version=excluded.software_version,"
            " num_examples=excluded.num_examples, last_seen=excluded.last_seen,"
            " cert_serial=excluded.cert_serial, cert_issuer=excluded.cert_issuer,"
            " cert_not_after=excluded.cert_not_after, differential_privacy=excluded.differential_privacy",
            agent,
            cloud,
            software_version,
            num_examples,
            now,
            now,
            cert.serial_hex,
            cert.issuer_der,
            cert.not_after,
            differential_privacy,
        )

    def eval_withheld(self, agent: str, withheld: WithheldEval) -> None:
        """Record that ``agent`` withheld its eval loss of a version, and why."""
        self._tx(
            "UPDATE agents SET eval_withheld_version = ?, eval_withheld_reason = ?, eval_withheld_words = ?"
            " WHERE agent = ?",
            withheld.version,
            withheld.reason,
            withheld.words,
            agent,
        )

    def agent_privacy(self, agent: str, differential_privacy: str) -> None:
        """Restate the DP guarantee shown for ``agent`` (its spend after a round)."""
        self._tx("UPDATE agents SET differential_privacy = ? WHERE agent = ?", differential_privacy, agent)

    def round_started(
        self, round_id: int, base_version: int, deadline: float, participants: list[str]
    ) -> None:
        """Record a new round and its participants."""
        now = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO rounds (round_id, base_version, phase, started_at, deadline) "
                "VALUES (?, ?, 'UPLOAD', ?, ?)",
                (round_id, base_version, now, deadline),
            )
            self._db.executemany(
                "INSERT INTO participants (round_id, agent, status, updated_at) VALUES (?, ?, 'selected', ?)",
                [(round_id, a, now) for a in participants],
            )

    def phase(self, round_id: int, phase: str) -> None:
        """Record a phase change."""
        self._tx("UPDATE rounds SET phase=? WHERE round_id=?", phase, round_id)

    def declined(self, round_id: int, agent: str) -> None:
        """Record that a participant declined the round."""
        self._tx(
            "UPDATE participants SET status='declined', updated_at=? WHERE round_id=? AND agent=?",
            time.time(),
            round_id,
            agent,
        )

    def uploaded(self, round_id: int, agent: str, nbytes: int, weight: float) -> None:
        """Record a participant's update as added to the round's sum."""
        self._tx(
            "UPDATE participants SET status='uploaded', bytes=?, weight=?, updated_at=? "
            "WHERE round_id=? AND agent=?",
            nbytes,
            weight,
            time.time(),
            round_id,
            agent,
        )

    def round_ended(
        self,
        round_id: int,
        phase: str,
        reason: str = "",
        new_version: int | None = None,
        dropped: Sequence[str] = (),
    ) -> None:
        """Record a round's outcome (COMPLETED or ABANDONED) and its dropped participants."""
        now = time.time()
        with self._transaction():
            self._db.execute(
                "UPDATE rounds SET phase=?, ended_at=?, reason=?, new_version=? WHERE round_id=?",
                (phase, now, reason or None, new_version, round_id),
            )
            self._db.executemany(
                "UPDATE participants SET status='dropped', updated_at=? WHERE round_id=? AND agent=?",
                [(now, round_id, a) for a in dropped],
            )

    def version_committed(
        self, version: int, parent: int | None, round_id: int | None, sha256: str, participants: int
    ) -> None:
        """Record a committed global version (after its checkpoint and manifest exist)."""
        self._tx(
            "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?)",
            version,
            parent,
            round_id,
            time.time(),
            sha256,
            participants,
        )

    def eval_reported(self, agent: str, version: int, report: AgentEval) -> None:
        """Record an agent's evaluation of a version."""
        self._tx(
            "INSERT OR REPLACE INTO evals (agent, version, eval_loss, tokens, reported_at, loss_stddev)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            agent,
            version,
            report.loss,
            report.tokens,
            time.time(),
            report.stddev,
        )

    def rounds(self, limit: int = 20) -> list[RoundRow]:
        """The latest rounds, newest first."""
        rows = self._db.execute(
            "SELECT r.round_id, r.base_version, r.phase, r.started_at, r.ended_at, r.new_version, r.reason, "
            "COUNT(p.agent), SUM(p.status = 'uploaded'), "
            "SUM(CASE WHEN p.status = 'uploaded' THEN p.bytes END) FROM rounds r LEFT JOIN participants p "
            "ON p.round_id = r.round_id GROUP BY r.round_id ORDER BY r.round_id DESC LIMIT ?",
            (limit,),
        )
        return [
            RoundRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], int(r[7]), int(r[8] or 0), int(r[9] or 0))
            for r in rows
        ]

    def participant_status(self, round_id: int) -> dict[str, str]:
        """{agent: status} for a round."""
        return dict(self._db.execute("SELECT agent, status FROM participants WHERE round_id=?", (round_id,)))

    def agents(self) -> list[AgentRow]:
        """Every agent that ever joined, by name."""
        rows = self._db.execute(
            "SELECT agent, last_seen, num_examples, cert_serial, cert_issuer, cert_not_after,"
            " differential_privacy, eval_withheld_version, eval_withheld_reason, eval_withheld_words"
            " FROM agents ORDER BY agent"
        )
        return [
            AgentRow(
                str(a),
                float(seen),
                int(n or 0),
                AgentCertificate(serial or "", bytes(issuer or b""), until),
                dp or "",
                None
                if withheld is None
                else WithheldEval(int(withheld), label or "unspecified", words or ""),
            )
            for a, seen, n, serial, issuer, until, dp, withheld, label, words in rows
        ]

    def latest_evals(self) -> dict[str, tuple[int, AgentEval]]:
        """{agent: (version, evaluation)} of each agent's newest evaluation."""
        rows = self._db.execute(
            "SELECT agent, version, eval_loss, tokens, loss_stddev FROM evals e WHERE version = "
            "(SELECT MAX(version) FROM evals WHERE agent = e.agent) ORDER BY agent"
        )
        return {
            agent: (int(version), AgentEval(float(loss), int(tokens or 0), float(stddev)))
            for agent, version, loss, tokens, stddev in rows
        }

    def version_evals(self) -> dict[int, dict[str, AgentEval]]:
        """{version: {agent: evaluation}} of every evaluation reported."""
        rows = self._db.execute(
            "SELECT version, agent, eval_loss, tokens, loss_stddev FROM evals ORDER BY version, agent"
        )
        table: dict[int, dict[str, AgentEval]] = {}
        for version, agent, loss, tokens, stddev in rows:
            report = AgentEval(float(loss), int(tokens or 0), float(stddev))
            table.setdefault(int(version), {})[agent] = report
        return table

    def versions(self) -> list[tuple[int, int | None, int | None, int]]:
        """(version, parent, round_id, participants), ascending."""
        rows = self._db.execute(
            "SELECT version, parent, round_id, participants FROM versions ORDER BY version"
        )
        return [(int(v), parent, round_id, int(n)) for v, parent, round_id, n in rows]
