"""The main job as real processes: aggregator + 3 agent daemons fine-tune a tiny LM together, with
secure aggregation on (the demo's default): the aggregator only ever sees the masked sum."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agent.data import Example, TokenBlocks, load_texts, pack_records, split
from agent.demo import CLOUDS, evals, run_federation
from common.codecs.countsketch import CountSketch
from common.codecs.state import CodecState
from common.config import AgentConfig, load
from common.layout import ParamLayout
from server.checkpoints import CheckpointStore
from server.fetchsgd import FetchSGD
from tests.daemons import run_cli
from tests.test_faults import query

pytestmark = pytest.mark.slow
ROUNDS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, float]]]:
    root = tmp_path_factory.mktemp("federation")
    table = run_federation(root, ROUNDS, show=False, timeout_s=400)
    return root, table


def test_three_agents_complete_rounds_and_the_global_loss_goes_down(federation) -> None:
    root, table = federation
    complete = sorted(v for v, losses in table.items() if set(losses) == set(CLOUDS))
    assert complete[: ROUNDS + 1] == list(range(ROUNDS + 1)), (
        table,
        (root / "aggregator.log").read_text()[-2000:],
    )
    before = np.mean(list(table[0].values()))
    after = np.mean(list(table[ROUNDS].values()))
    assert after < before - 0.05, (before, after)
    store = CheckpointStore(root / "aggregator-state" / "checkpoints")
    assert store.versions()[: ROUNDS + 1] == list(range(ROUNDS + 1))
    assert len(store.manifest(1).participants) == len(CLOUDS)


def test_each_aggregate_is_the_weighted_mean_of_the_audited_updates(federation) -> None:
    root, _ = federation
    store = CheckpointStore(root / "aggregator-state" / "checkpoints")
    audits: dict[int, list[tuple[dict, float]]] = {}
    for meta_path in sorted(root.glob("*-agent-1/audit/round-*.json")):
        meta = json.loads(meta_path.read_text())
        delta = load_file(meta_path.with_suffix(".safetensors"))
        audits.setdefault(meta["base_version"], []).append((delta, meta["weight"]))
    assert set(range(ROUNDS)) <= set(audits)
    for base in range(ROUNDS):
        updates = audits[base]
        assert len(updates) == len(CLOUDS)
        assert len({w for _, w in updates}) == len(CLOUDS)  # distinct weights: a plain mean would fail
        layout = ParamLayout.from_tensors(updates[0][0])
        expected = sum(w * layout.flatten(d).astype(np.float64) for d, w in updates) / sum(
            w for _, w in updates
        )
        step = layout.flatten(store.load(base + 1)).astype(np.float64) - layout.flatten(store.load(base))
        np.testing.assert_allclose(step, expected, rtol=1e-4, atol=1e-6)


def test_the_best_version_exports_as_the_model_each_cloud_evaluated(federation, tmp_path: Path) -> None:
    """``cloudfed-aggregator export --merge`` after the real rounds. It picks the version with the
    lowest token-weighted eval loss (checked against the agents' own histories, not the aggregator's
    database), and the exported adapter, loaded by peft, scores on each cloud's held-out text what
    that cloud reported for the version; the merged model scores the same."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = federation
    out = tmp_path / "export"
    done = run_cli(
        "server.cli",
        "--config",
        str(root / "aggregator.toml"),
        "export",
        "--out",
        str(out),
        "--merge",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "cloudfed.json").read_text())
    reported: dict[int, dict[str, tuple[float, int]]] = {}
    configs = sorted(root.glob("*-agent-1/agent.toml"))
    for config in configs:
        for line in (config.parent / "state" / "evals.jsonl").read_text().splitlines():
            r = json.loads(line)
            reported.setdefault(r["version"], {})[config.parent.name] = (r["eval_loss"], r["tokens"])
    complete = {v: e for v, e in reported.items() if len(e) == len(CLOUDS)}

    def weighted(e: dict[str, tuple[float, int]]) -> float:
        return sum(loss * n for loss, n in e.values()) / sum(n for _, n in e.values())

    version = min(complete, key=lambda v: weighted(complete[v]))
    assert record["version"] == version and version >= 1, (record, complete)
    assert record["eval_loss"] == pytest.approx(weighted(complete[version]), abs=1e-9)

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "model"), str(out))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    for config in configs:
        agent = load(AgentConfig, config)
        held_out = split(load_texts(agent.data), agent.eval_fraction)[1]
        blocks = pack_records(tokenizer, [Example.plain(t) for t in held_out], 64).to("cpu")
        loss, tokens = complete[version][config.parent.name]
        assert held_out_loss(adapted, blocks) == (pytest.approx(loss, abs=1e-5), tokens), config
        assert held_out_loss(merged, blocks)[0] == pytest.approx(loss, abs=1e-4), config


def held_out_loss(model: Any, blocks: TokenBlocks) -> tuple[float, int]:
    """Token-weighted next-token loss over the learned tokens, as the agents compute it (batches
    of 16 blocks, each packed record attended alone), by transformers' own loss."""
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), 16):
            batch = blocks[i : i + 16]
            n = batch.learned_tokens
            out = model(
                input_ids=batch.input_ids,
                labels=batch.labels,
                position_ids=batch.position_ids(),
                use_cache=False,
            )
            total += out.loss.item() * n
            tokens += n
    return total / tokens, tokens


def test_masked_rounds_match_the_same_rounds_unmasked(federation, tmp_path: Path) -> None:
    """Same model, data and seeds with masking off: the first global version agrees up to fixed point."""
    root, _ = federation
    plain = run_federation(tmp_path, 1, show=False, timeout_s=300, secagg=False)
    assert 1 in plain, (tmp_path / "aggregator.log").read_text()[-2000:]
    masked_store = CheckpointStore(root / "aggregator-state" / "checkpoints")
    plain_store = CheckpointStore(tmp_path / "aggregator-state" / "checkpoints")
    layout = ParamLayout.from_tensors(masked_store.load(0))
    base = layout.flatten(plain_store.load(0)).astype(np.float64)
    np.testing.assert_array_equal(base, layout.flatten(masked_store.load(0)))
    masked_step = layout.flatten(masked_store.load(1)).astype(np.float64) - base
    plain_step = layout.flatten(plain_store.load(1)).astype(np.float64) - base
    # 24-bit fixed point over [-0.5, 0.5]: each agent is off by < 6e-8 per coordinate.
    np.testing.assert_allclose(masked_step, plain_step, rtol=0, atol=1e-6)
    assert np.abs(plain_step).max() > 1e-3  # the comparison is not between two zero steps
    assert plain[1] == pytest.approx(_table_at(root, 1), abs=1e-3)


def run_demo(root: Path, rounds: int, *options: str) -> subprocess.CompletedProcess[str]:
    """``python -m agent.demo --rounds N --dir root ...``, which must succeed."""
    done = run_cli("agent.demo", "--rounds", str(rounds), "--dir", str(root), *options, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _table_at(root: Path, version: int) -> dict[str, float]:
    return evals(sorted(root.glob("*-agent-1/agent.toml")))[version]


def test_projection_under_masking_cuts_uplink_bytes_and_the_loss_goes_down(tmp_path: Path) -> None:
    """projection (ratio 4) -> fixed point -> masking, with the real daemons."""
    table = run_federation(tmp_path, 2, show=False, timeout_s=300, codec="projection", codec_ratio=4)
    assert {0, 1, 2} <= set(table), (tmp_path / "aggregator.log").read_text()[-2000:]
    before, after = np.mean(list(table[0].values())), np.mean(list(table[2].values()))
    assert after < before - 0.05, (before, after)
    masked, numel = _upload_size(tmp_path)
    assert masked < 4 * numel / 3.5  # about a quarter of the float32 update, weight included


def test_eigen_bases_are_served_by_digest_and_masked_rounds_train(tmp_path: Path) -> None:
    """`python -m agent.demo --codec eigen --codec-ratio 4`: EoRA-style bases from public text ->
    fixed point -> masking, with the real daemons. Every agent fetches the aggregator's bases file
    by digest, the loss goes down, and the demo says what an upload cost against float32."""
    root = tmp_path / "run"
    done = run_demo(root, 2, "--codec", "eigen", "--codec-ratio", "4")
    assert "secure aggregation on (24-bit values), codec eigen (ratio 4)" in done.stdout
    table = evals(sorted(root.glob("*-agent-1/agent.toml")))
    assert {0, 1, 2} <= set(table), (root / "aggregator.log").read_text()[-2000:]
    before, after = np.mean(list(table[0].values())), np.mean(list(table[2].values()))
    assert after < before - 0.05, (before, after)
    digest = CodecState.of(root / "eigen-bases.safetensors").sha256
    for agent_dir in root.glob("*-agent-1"):
        fetched = agent_dir / "state" / "codec" / f"state-{digest}.safetensors"
        assert CodecState.of(fetched).sha256 == digest, agent_dir.name
    masked, numel = _upload_size(root)
    assert masked < 4 * numel / 3.5  # about a quarter of the float32 update, weight included
    said = (
        f"each agent uploaded {masked / 1e3:.1f} kB a round (eigen, masked); the float32 update is"
        f" {4 * numel / 1e3:.1f} kB: {4 * numel / masked:.1f}x fewer bytes"
    )
    assert said in done.stdout, done.stdout


def test_the_demo_refuses_a_codec_masking_cannot_sum(tmp_path: Path) -> None:
    """`--codec topk` with masking on: the aggregator's own check, said at once (exit 2)."""
    done = run_cli(
        "agent.demo", "--rounds", "1", "--dir", str(tmp_path / "run"), "--codec", "topk", timeout=120
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error: secagg: codec 'topk' has a nonlinear decoder" in done.stdout
    assert not (tmp_path / "run" / "aggregator.log").exists()  # no daemon was started


def test_adaptive_clip_bounds_from_the_last_aggregate_make_4_bit_masked_rounds_accurate(
    tmp_path: Path,
) -> None:
    """secagg.bits = 4 with adaptive_clip = 3: the first round uses the fixed clip (0.5, far too wide
    for 4 bits); every later round's bounds come from the aggregate before it, so its step is close
    to the weighted mean of the agents' (audited) updates. On the wire, 5 codes (0 .. 15) to a
    28-bit element: 3 agents' sums take 46 values, log2(46) = 5.52 bits, 5.6 bits a code."""
    table = run_federation(tmp_path, 3, show=False, timeout_s=400, secagg_bits=4, adaptive_clip=3.0)
    assert {0, 3} <= set(table), (tmp_path / "aggregator.log").read_text()[-2000:]
    assert np.mean(list(table[3].values())) < np.mean(list(table[0].values())) - 0.05
    store = CheckpointStore(tmp_path / "aggregator-state" / "checkpoints")
    errors = []
    for base in range(3):
        updates = []
        for meta_path in tmp_path.glob(f"*-agent-1/audit/round-{base + 1:06d}.json"):
            meta = json.loads(meta_path.read_text())
            updates.append((load_file(meta_path.with_suffix(".safetensors")), meta["weight"]))
        assert len(updates) == len(CLOUDS), base
        layout = ParamLayout.from_tensors(updates[0][0])
        expected = sum(w * layout.flatten(d).astype(np.float64) for d, w in updates) / sum(
            w for _, w in updates
        )
        step = layout.flatten(store.load(base + 1)).astype(np.float64) - layout.flatten(store.load(base))
        errors.append(float(np.linalg.norm(step - expected) / np.linalg.norm(expected)))
    assert max(errors[1:]) < 0.4 and max(errors[1:]) < errors[0] / 2, errors
    masked, numel = _upload_size_of_round(tmp_path, 2)
    # sized for 3 invited agents, not max_agents (16): 5 codes a 28-bit element; 6 weight digits
    assert masked == (-(-(numel + 6) // 5) * 28 + 7) // 8
    assert sorted(p.name for p in (tmp_path / "aggregator-state" / "aggregates").iterdir()) == [
        "mean-v00000002.npy",
        "mean-v00000003.npy",
    ]


@pytest.mark.parametrize("secagg", [True, False], ids=["masked", "plain"])
def test_countsketch_rounds_go_through_fetchsgd(tmp_path: Path, secagg: bool) -> None:
    """Agents send count sketches (ratio 4); the aggregator sums them (masked, or plain without
    decoding each) and FetchSGD's loop turns the sum into k-sparse steps, state saved per version.
    Each step is what FetchSGD makes of the sketched weighted mean of the audited updates."""
    table = run_federation(
        tmp_path, 3, show=False, timeout_s=400, secagg=secagg, codec="countsketch", codec_ratio=4
    )
    assert {0, 3} <= set(table), (tmp_path / "aggregator.log").read_text()[-2000:]
    store = CheckpointStore(tmp_path / "aggregator-state" / "checkpoints")
    layout = ParamLayout.from_tensors(store.load(0))
    sketch = CountSketch(layout.numel, 4, 0)  # the demo's seed
    k = round(0.1 * sketch.cols)
    replay = FetchSGD(sketch, k, 0.0, tmp_path / "replay")
    for version in (1, 2, 3):
        step = layout.flatten(store.load(version)) - layout.flatten(store.load(version - 1))
        assert 0 < np.count_nonzero(step) <= k, version
        updates = _audited(tmp_path, version)
        mean = sum(w * sketch.encode(layout.flatten(d)).astype(np.float64) for d, w in updates) / sum(
            w for _, w in updates
        )
        expected = replay.step(mean, version)
        chosen, replayed = set(np.flatnonzero(step)), set(np.flatnonzero(expected))
        common = sorted(chosen & replayed)  # fixed point may swap a near-tie at the k-th place
        assert len(common) > 0.9 * len(replayed), version
        np.testing.assert_allclose(step[common], expected[common], atol=1e-4 * np.abs(expected).max())
    assert sorted(p.name for p in (tmp_path / "aggregator-state" / "fetchsgd").iterdir()) == [
        "fetchsgd-v00000002.safetensors",
        "fetchsgd-v00000003.safetensors",
    ]
    size, _ = _upload_size_of_round(tmp_path, 3)
    cells = sketch.coordinates(layout.numel)
    assert size == (((cells + 1) * 26 + 7) // 8 if secagg else 4 + 4 * cells)  # masked: 24 + log2(3 agents)


def _audited(root: Path, version: int) -> list[tuple[dict, float]]:
    """(update, weight) of every agent in the round that produced ``version``."""
    updates = []
    for meta_path in root.glob(f"*-agent-1/audit/round-{version:06d}.json"):
        meta = json.loads(meta_path.read_text())
        assert meta["base_version"] == version - 1
        updates.append((load_file(meta_path.with_suffix(".safetensors")), meta["weight"]))
    assert len(updates) == len(CLOUDS), version
    return updates


def _upload_size_of_round(root: Path, round_id: int) -> tuple[int, int]:
    db = root / "aggregator-state" / "cloudfed.db"
    with sqlite3.connect(db) as conn:
        sizes = {
            b
            for (b,) in conn.execute(
                "SELECT bytes FROM participants WHERE status = 'uploaded' AND round_id = ?", (round_id,)
            )
        }
    (size,) = sizes
    return size, ParamLayout.from_tensors(CheckpointStore(db.parent / "checkpoints").load(0)).numel


def _upload_size(root: Path) -> tuple[int, int]:
    """(bytes of every agent's upload, all the same size; adapter parameters) from the aggregator."""
    db = root / "aggregator-state" / "cloudfed.db"
    with sqlite3.connect(db) as conn:
        sizes = {b for (b,) in conn.execute("SELECT bytes FROM participants WHERE status = 'uploaded'")}
    (size,) = sizes
    return size, ParamLayout.from_tensors(CheckpointStore(db.parent / "checkpoints").load(0)).numel


def test_autoencoder_under_masking_warms_up_then_encodes_and_the_loss_goes_down(tmp_path: Path) -> None:
    """CG-FedLLM with the real daemons: 2 full rounds (TGAP on their masked means), then rounds
    encoded 8x with the linear decoder under masking; agents fetch the network by digest."""
    table = run_federation(tmp_path, 4, show=False, timeout_s=400, codec="autoencoder", codec_ratio=8)
    assert {0, 4} <= set(table), (tmp_path / "aggregator.log").read_text()[-2000:]
    before, after = np.mean(list(table[0].values())), np.mean(list(table[4].values()))
    assert after < before - 0.05, (before, after)
    db = tmp_path / "aggregator-state" / "cloudfed.db"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT round_id, bytes FROM participants WHERE status = 'uploaded'").fetchall()
    by_round: dict[int, set[int]] = {}
    for round_id, size in rows:
        by_round.setdefault(round_id, set()).add(size)
    sizes = [by_round[r].pop() for r in sorted(by_round)]
    assert len(sizes) == 4 and sizes[0] == sizes[1] and sizes[2] == sizes[3], sizes
    assert sizes[2] < sizes[0] / 6  # the encoded rounds: 8 values become 1 code
    progress = json.loads((tmp_path / "aggregator-state" / "codec" / "progress.json").read_text())
    assert progress["encoded_since"] == 2 and progress["state"].startswith("autoencoder-")
    digest = progress["state"].removeprefix("autoencoder-").removesuffix(".safetensors")
    for agent_dir in tmp_path.glob("*-agent-1"):
        fetched = agent_dir / "state" / "codec" / f"state-{digest}.safetensors"
        assert CodecState.of(fetched).sha256 == digest, agent_dir.name


def test_autoencoder_with_the_mlp_decoder_in_plain_rounds(tmp_path: Path) -> None:
    """The nonlinear decoder (trusted aggregator, no masking): each agent's codes decoded on their own."""
    table = run_federation(
        tmp_path, 3, show=False, timeout_s=400, secagg=False, codec="autoencoder", codec_ratio=8
    )
    assert {0, 3} <= set(table), (tmp_path / "aggregator.log").read_text()[-2000:]
    assert np.mean(list(table[3].values())) < np.mean(list(table[0].values())) - 0.05
    db = tmp_path / "aggregator-state" / "cloudfed.db"
    with sqlite3.connect(db) as conn:
        encoded = {b for (b,) in conn.execute("SELECT bytes FROM participants WHERE round_id = 3")}
    numel = ParamLayout.from_tensors(CheckpointStore(db.parent / "checkpoints").load(0)).numel
    (size,) = encoded
    assert size == 4 + 4 * (-(-numel // 64) * 8 + 1)  # weight, then 8 codes a block of 64 and the scale
    # Trusted: TGAP learned from each agent's update of the 2 warm-up rounds, not from their means.
    codec_dir = tmp_path / "aggregator-state" / "codec"
    snapshots = sorted(p.name for p in (codec_dir / "snapshots").glob("*.npy"))
    assert snapshots == [f"{r:08d}-{a:03d}.npy" for r in range(2) for a in range(len(CLOUDS))]
    audited = sorted(
        float(np.linalg.norm(ParamLayout.from_tensors(d).flatten(d))) for d, _ in _audited(tmp_path, 1)
    )
    first = snapshots[: len(CLOUDS)]
    staged = sorted(float(np.linalg.norm(np.load(codec_dir / "snapshots" / n))) for n in first)
    np.testing.assert_allclose(staged, audited, rtol=1e-5)


def test_the_demo_runs_with_a_dp_cloud_and_a_qlora_cloud_and_says_what_dp_spent(tmp_path: Path) -> None:
    """`python -m agent.demo --dp aws --nf4 gcp`, as a user runs it: masked rounds in which aws
    trains with DP-SGD (budget planned for the demo's rounds) and gcp over a 4-bit base; the loss
    still goes down (gcp's own too), the export works, and the demo ends with aws' spend, which
    its ledger holds (both rounds, and its count release), and why its eval losses stayed in its
    cloud."""
    done = run_demo(tmp_path / "run", 2, "--dp", "aws", "--nf4", "gcp")
    assert "secure aggregation on (24-bit values), DP-SGD in aws, QLoRA (a 4-bit base) in gcp" in done.stdout
    gcp = load(AgentConfig, tmp_path / "run" / "gcp-agent-1" / "agent.toml")
    assert gcp.precision == "nf4"
    table = evals(sorted((tmp_path / "run").glob("*-agent-1/agent.toml")))
    assert table[2]["gcp"] < table[0]["gcp"] - 0.05, table
    ledger = json.loads(
        (tmp_path / "run" / "aws-agent-1" / "state" / "privacy" / "dp-ledger.json").read_text()
    )
    assert [s["round_id"] for s in ledger["spends"]] == [1, 2]
    # its 11 held-out records are far too few for a useful release: it released their count,
    # saw the noise a loss would carry, and kept its eval losses in the cloud
    assert [c["kind"] for c in ledger["counts"]] == ["units", "eval_units"] and ledger["evals"] == []
    spent = [line for line in done.stdout.splitlines() if line.startswith("aws: DP-SGD: epsilon ")]
    assert len(spent) == 1 and " of 8 spent over 2 rounds" in spent[0], done.stdout
    kept = [
        line for line in done.stdout.splitlines() if line.startswith("aws: eval losses kept in the cloud: ")
    ]
    assert len(kept) == 1 and "over privacy.dp.eval_max_deviation (0.1)" in kept[0], done.stdout
    db = tmp_path / "run" / "aggregator-state" / "cloudfed.db"  # and told the aggregator why
    [(version, label, why)] = query(
        db,
        "SELECT eval_withheld_version, eval_withheld_reason, eval_withheld_words FROM agents"
        " WHERE agent LIKE '%/aws/%'",
    )
    assert version == 2 and label == "too_noisy"
    assert why.startswith("kept in its cloud: with ") and "eval_max_deviation" in why
    assert not (tmp_path / "run" / "gcp-agent-1" / "state" / "privacy").exists()  # the others train plainly
