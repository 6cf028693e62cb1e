"""Server optimizer and durable state, in-process with real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from common.errors import ConfigError
from server.optimizer import FedAdam, FedAvg, make_optimizer
from server.state import StateDB, WithheldEval


def test_fedavg_applies_the_server_learning_rate() -> None:
    x, d = np.ones(4, np.float32), np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(FedAvg(0.5).step(x, d, 1), x + 0.5 * d)


def test_fedadam_matches_adam_and_resumes_its_moments_from_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16).astype(np.float32)
    deltas = [rng.standard_normal(16).astype(np.float32) for _ in range(3)]
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    m = v = np.zeros(16)
    expected = x.astype(np.float64)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        expected = expected + lr * m / (np.sqrt(v) + tau)
    opt = FedAdam(tmp_path, lr, b1, b2, tau)
    got = opt.step(x, deltas[0], version=1)
    restarted = FedAdam(tmp_path, lr, b1, b2, tau)  # a new process: moments come from disk
    got = restarted.step(got, deltas[1], version=2)
    before_last = got
    got = restarted.step(got, deltas[2], version=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # only the latest two versions' moments stay: the disk does not grow by 2 adapters a round
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"fedadam-v{v:08d}.safetensors" for v in (2, 3)]
    # a crash before version 3 was committed reruns its round from version 2's moments
    rerun = FedAdam(tmp_path, lr, b1, b2, tau).step(before_last, deltas[2], version=3)
    np.testing.assert_array_equal(rerun, got)


def test_unknown_optimizer_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server_optimizer"):
        make_optimizer("sgd", 1.0, tmp_path)


def test_rounds_in_flight_at_a_crash_are_marked_interrupted(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "s.db")
    db.round_started(1, 0, 0.0, ["a", "b"])
    db.uploaded(1, "a", 10, 2.0)
    db.version_committed(1, 0, 1, "ab" * 32, 2)
    db.round_ended(1, "COMPLETED", new_version=1, dropped=["b"])
    db.round_started(2, 1, 0.0, ["a"])
    db.close()  # the process dies here with round 2 open
    reopened = StateDB(tmp_path / "s.db")
    assert reopened.recover() == [2]
    rounds = {r.round_id: r for r in reopened.rounds()}
    assert rounds[1].phase == "COMPLETED"
    assert rounds[1].uploaded == 1 and rounds[1].uploaded_bytes == 10
    assert rounds[1].participants == 2
    assert rounds[2].phase == "ABANDONED"
    assert "restarted" in (rounds[2].reason or "")
    assert reopened.participant_status(1) == {"a": "uploaded", "b": "dropped"}
    assert reopened.last_round_id() == 2
    assert reopened.recover() == []


def test_a_round_outcome_and_its_dropped_participants_commit_together(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    db.round_started(1, 0, 0.0, ["a", "b"])
    reader = sqlite3.connect(tmp_path / "state.db")  # another process looking, as `cloudfed status` does
    with db._transaction():
        db._db.execute("UPDATE rounds SET ended_at = 1.0 WHERE round_id = 1")
        assert reader.execute("SELECT ended_at FROM rounds").fetchone() == (None,)  # not visible yet
    assert reader.execute("SELECT ended_at FROM rounds").fetchone() == (1.0,)

    def half_way_failure() -> None:
        with db._transaction():
            db._db.execute("UPDATE rounds SET phase = 'COMPLETED' WHERE round_id = 1")
            db._db.execute(
                "INSERT INTO participants (round_id, agent, status, updated_at) VALUES (1, 'a', 'x', 0)"
            )

    with pytest.raises(sqlite3.IntegrityError):  # a failure half-way rolls the whole transaction back
        half_way_failure()
    assert reader.execute("SELECT phase FROM rounds").fetchone() == ("UPLOAD",)
    db.round_ended(1, "COMPLETED", new_version=1, dropped=["b"])
    assert db.participant_status(1) == {"a": "selected", "b": "dropped"}


def test_a_database_of_an_older_release_gains_the_new_columns_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    """The agents table before certificates and DP guarantees were kept, the evals table before
    DP noise deviations were: opening it adds the columns (nothing else changes), old rows read as
    'not recorded' (an old eval as exact), and a new Join or evaluation fills them in."""
    from common.identity import SpiffeId
    from common.pki import create_ca, issue_agent
    from server.state import AgentCertificate
    from server.version_ranking import AgentEval

    path = tmp_path / "cloudfed.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE agents (agent TEXT PRIMARY KEY, cloud TEXT NOT NULL, software_version TEXT,"
        " num_examples INTEGER, joined_at REAL NOT NULL, last_seen REAL NOT NULL)"
    )
    old.execute("INSERT INTO agents VALUES ('spiffe://t/cloud/aws/agent/a1', 'aws', '0.1', 7, 1.0, 2.0)")
    old.execute(
        "CREATE TABLE evals (agent TEXT NOT NULL, version INTEGER NOT NULL, eval_loss REAL NOT NULL,"
        " tokens INTEGER, reported_at REAL NOT NULL, PRIMARY KEY (agent, version))"
    )
    old.execute("INSERT INTO evals VALUES ('spiffe://t/cloud/aws/agent/a1', 0, 5.5, 900, 3.0)")
    old.commit()
    old.close()

    db = StateDB(path)
    [row] = db.agents()
    assert (row.agent, row.num_examples, row.last_seen) == ("spiffe://t/cloud/aws/agent/a1", 7, 2.0)
    assert row.certificate.not_after is None and row.certificate.serial_hex == ""
    assert row.differential_privacy == "" and row.withheld is None
    cert = issue_agent(create_ca("ca"), SpiffeId.parse("spiffe://t/cloud/aws/agent/a1")).cert
    db.agent_joined("spiffe://t/cloud/aws/agent/a1", "aws", "0.2", 9, AgentCertificate.of(cert), "user-level")
    [row] = db.agents()
    assert row.num_examples == 9 and row.differential_privacy == "user-level"
    assert row.certificate.serial_hex == f"{cert.serial_number:x}"
    assert row.certificate.issuer_der == cert.issuer.public_bytes()
    assert row.certificate.not_after == cert.not_valid_after_utc.timestamp()
    a1 = "spiffe://t/cloud/aws/agent/a1"
    assert db.version_evals() == {0: {a1: AgentEval(5.5, 900, 0.0)}}
    db.eval_reported(a1, 1, AgentEval(5.25, 800, 0.07))
    assert db.version_evals()[1] == {a1: AgentEval(5.25, 800, 0.07)}
    assert db.latest_evals() == {a1: (1, AgentEval(5.25, 800, 0.07))}
    db.eval_withheld(a1, WithheldEval(2, "not_shared", "kept in its cloud"))
    assert db.agents()[0].withheld == (2, "not_shared", "kept in its cloud")
    db.close()
    StateDB(path).close()  # opening it again adds nothing twice


@pytest.mark.parametrize("release", ["words only", "words and reason"])
def test_the_withheld_columns_of_an_older_release_are_renamed_and_keep_their_values(
    tmp_path: Path, release: str
) -> None:
    """Older releases kept a withheld eval's words as ``eval_withheld_reason`` and (the last one)
    its reason label as ``eval_withheld_why``: opening such a database renames them to
    ``eval_withheld_words`` and ``eval_withheld_reason`` with their values, once."""
    path = tmp_path / "cloudfed.db"
    StateDB(path).close()  # today's schema, then taken back to the older release's
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE agents RENAME COLUMN eval_withheld_reason TO eval_withheld_why")
    old.execute("ALTER TABLE agents RENAME COLUMN eval_withheld_words TO eval_withheld_reason")
    if release == "words only":
        old.execute("ALTER TABLE agents DROP COLUMN eval_withheld_why")
    old.execute(
        "INSERT INTO agents (agent, cloud, joined_at, last_seen, eval_withheld_version, eval_withheld_reason)"
        " VALUES ('a1', 'aws', 1.0, 2.0, 3, 'kept in its cloud')"
    )
    if release == "words and reason":
        old.execute("UPDATE agents SET eval_withheld_why = 'not_shared'")
    old.commit()
    old.close()

    for _ in range(2):  # a second opening renames nothing again
        db = StateDB(path)
        label = "not_shared" if release == "words and reason" else "unspecified"
        assert db.agents()[0].withheld == (3, label, "kept in its cloud")
        db.close()
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(agents)")]
    assert "eval_withheld_why" not in columns
    assert columns.count("eval_withheld_reason") == columns.count("eval_withheld_words") == 1
    db = StateDB(path)
    db.eval_withheld("a1", WithheldEval(4, "too_noisy", "noise 0.3 nats"))
    assert db.agents()[0].withheld == (4, "too_noisy", "noise 0.3 nats")
    db.close()
