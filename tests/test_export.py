"""Export: a global version out as a peft adapter directory that peft and transformers load as is,
chosen by number, as the latest or as the best by the agents' evaluations; merged weights on
request; and every refusal leaves nothing behind. Real tiny model, real SQLite, real daemons' CLIs."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from agent.data import pack
from agent.export import ADAPTER_WEIGHTS, PROVENANCE, ExportError, check_adapter
from agent.trainer import LocalTraining, LoraSpec, LoraTrainer
from common.config import AggregatorConfig, FederationConfig
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus
from server.checkpoints import CheckpointStore
from server.export import choose_version, export
from server.state import StateDB
from server.version_ranking import AgentEval, weighted_loss
from tests.conftest import Pki, aggregator_config
from tests.daemons import run_cli

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj"))
EVALS = {  # version: {agent: evaluation}; v2 has the lowest loss but only one agent evaluated it
    0: {"a": AgentEval(6.0, 100), "b": AgentEval(6.2, 100), "c": AgentEval(6.1, 100, 0.2)},
    1: {"a": AgentEval(5.0, 300), "b": AgentEval(5.6, 100), "c": AgentEval(5.1, 100, 0.2)},  # c: DP noise
    2: {"a": AgentEval(4.0, 100)},
}


@dataclasses.dataclass
class World:
    root: Path
    model: Path
    texts: list[str]
    versions: dict[int, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A tiny LM and three global versions made by real local training (B is not zero after v0)."""
    root = tmp_path_factory.mktemp("export")
    texts = [doc for domain in DOMAINS for doc in domain_corpus(domain, 12, seed=1)]
    model = build_tiny_lm(root / "model", texts)
    trainer = LoraTrainer(str(model), LORA)
    blocks = pack(trainer.tokenizer, texts, 32)
    versions = {0: trainer.adapter()}
    for v in (1, 2):
        delta, _ = trainer.train(blocks, LocalTraining(4, 5e-3, 4, 32, seed=v), round_id=v)
        versions[v] = {k: versions[v - 1][k] + d for k, d in delta.items()}
    return World(root, model, texts, versions)


def make_state(world: World, state: Path) -> None:
    store = CheckpointStore(state / "checkpoints")
    for v, tensors in world.versions.items():
        store.save(v, tensors, parent=v - 1 if v else None, participants=sorted(EVALS[v]))
    db = StateDB(state / "cloudfed.db")
    for v, evals in EVALS.items():
        for agent, report in evals.items():
            db.eval_reported(agent, v, report)
    db.close()


def config_for(pki: Pki, world: World, state: Path, **federation: Any) -> AggregatorConfig:
    base = aggregator_config(pki, state)
    fed = FederationConfig(
        model_id=str(world.model),
        lora_rank=LORA.rank,
        lora_alpha=LORA.alpha,
        target_modules=LORA.target_modules,
    )
    return dataclasses.replace(base, federation=dataclasses.replace(fed, **federation))


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def sample_ids(world: World) -> torch.Tensor:
    from transformers import AutoTokenizer

    return pack(AutoTokenizer.from_pretrained(world.model), world.texts[:6], 24)[:3]


def test_best_is_the_lowest_weighted_loss_of_the_versions_compared_over_the_same_agents() -> None:
    best = choose_version([0, 1, 2], EVALS, "best")
    assert best.version == 1  # c's noise: 0.2 x 100 / 500 tokens
    assert best.reason == (
        "the lowest token-weighted eval loss (5.1400 ± 0.04) of the 2 version(s) compared over the"
        " 3 agent(s) that evaluated them all"
    )
    assert weighted_loss(EVALS[1]) == pytest.approx((5.0 * 300 + 5.6 * 100 + 5.1 * 100) / 500)
    # weighted, not a plain mean: b's high loss on few tokens must not outweigh a's many tokens
    rival = {**EVALS, 3: {"a": AgentEval(5.35, 300), "b": AgentEval(4.9, 100), "c": AgentEval(4.9, 100)}}
    assert sum(v[0] for v in rival[3].values()) < sum(v[0] for v in EVALS[1].values())
    assert choose_version([0, 1, 2, 3], rival, "best").version == 1
    assert choose_version([0, 1, 2], EVALS, "latest").version == 2
    assert choose_version([0, 1, 2], EVALS, "0").version == 0
    assert choose_version([0, 1], EVALS, "best").version == 1  # evaluations of uncommitted v2 ignored
    for which, words in [("7", "no global version 7 (on disk: 0..2)"), ("newest", "latest, best or")]:
        with pytest.raises(ExportError, match=re.escape(words)):
            choose_version([0, 1, 2], EVALS, which)
    with pytest.raises(ExportError, match="no committed version has evaluations"):
        choose_version([0, 1, 2], {}, "best")
    with pytest.raises(ExportError, match="no global version is committed"):
        choose_version([], EVALS, "latest")


def test_the_export_loads_in_peft_as_the_model_the_agents_evaluated(
    world: World, pki: Pki, tmp_path: Path
) -> None:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    make_state(world, tmp_path / "state")
    out = tmp_path / "out"
    choice = export(
        config_for(pki, world, tmp_path / "state"), "best", out, merge=False, base=None, force=False
    )
    assert choice.version == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [ADAPTER_WEIGHTS, "adapter_config.json", PROVENANCE]
    )
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert saved.keys() == world.versions[1].keys()
    assert all(torch.equal(saved[k], world.versions[1][k]) for k in saved)
    config = PeftConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8.0, {"q_proj", "v_proj"})
    assert config.base_model_name_or_path == str(world.model)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), str(out))
    agent_side = LoraTrainer(str(world.model), LORA)  # how an agent applies a global version
    agent_side.set_adapter(world.versions[1])
    ids = sample_ids(world)
    torch.testing.assert_close(logits(peft_model, ids), logits(agent_side.model, ids), rtol=0, atol=0)
    untrained = LoraTrainer(str(world.model), LORA)  # the comparison is not between two base models
    assert (logits(peft_model, ids) - logits(untrained.model, ids)).abs().max() > 1e-3

    record = json.loads((out / PROVENANCE).read_text())
    manifest = CheckpointStore(tmp_path / "state" / "checkpoints").manifest(1)
    assert record["version"] == 1 and record["parent"] == 0 and record["checkpoint_sha256"] == manifest.sha256
    assert record["evals"]["a"] == {"eval_loss": 5.0, "tokens": 300, "eval_loss_stddev": 0.0}
    assert record["evals"]["c"] == {"eval_loss": 5.1, "tokens": 100, "eval_loss_stddev": 0.2}
    assert record["eval_loss"] == pytest.approx(weighted_loss(EVALS[1]))
    assert record["eval_loss_stddev"] == pytest.approx(0.2 * 100 / 500)
    assert record["chosen"] == choice.reason and record["merged"] is False
    from common.chunks import sha256_file

    assert record["files"] == {
        p.name: sha256_file(p).hexdigest() for p in out.iterdir() if p.name != PROVENANCE
    }


def test_merge_folds_the_adapter_into_the_base_weights(world: World, pki: Pki, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_state(world, tmp_path / "state")
    out = tmp_path / "out"
    export(config_for(pki, world, tmp_path / "state"), "2", out, merge=True, base=None, force=False)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), str(out))
    ids = sample_ids(world)
    torch.testing.assert_close(logits(merged, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(world.model)
    assert (logits(merged, ids) - logits(base, ids)).abs().max() > 1e-3
    text = world.texts[0]
    assert (
        AutoTokenizer.from_pretrained(out / "merged")(text)["input_ids"]
        == AutoTokenizer.from_pretrained(world.model)(text)["input_ids"]
    )
    record = json.loads((out / PROVENANCE).read_text())
    assert record["version"] == 2 and record["merged"] is True and record["merged_tokenizer"] is True
    assert "merged/model.safetensors" in record["files"]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refusals_name_the_problem_and_write_nothing(world: World, pki: Pki, tmp_path: Path) -> None:
    state = tmp_path / "state"
    make_state(world, state)
    config = config_for(pki, world, state)
    exports = tmp_path / "exports"
    exports.mkdir()

    # an existing export is kept unless --force, which replaces it whole
    old = exports / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not empty; pass --force"):
        export(config, "1", old, merge=False, base=None, force=False)
    assert [p.name for p in old.iterdir()] == ["keep.txt"]
    export(config, "1", old, merge=False, base=None, force=True)
    assert not (old / "keep.txt").exists() and (old / ADAPTER_WEIGHTS).exists()

    cases: list[tuple[str, AggregatorConfig, str, dict[str, Any], str]] = [
        ("other rank", config_for(pki, world, state, lora_rank=8), "1", {}, "is not a rank-8 LoRA factor"),
        (
            "other targets",
            config_for(pki, world, state, target_modules=("k_proj",)),
            "1",
            {},
            "target_modules",
        ),
        ("no base", config_for(pki, world, state, model_id=""), "1", {}, "base model is unknown"),
        (
            "base that does not fit",
            config,
            "1",
            {"merge": True, "base": str(tmp_path / "wide")},
            "does not take",
        ),
        ("base missing", config, "1", {"merge": True, "base": str(tmp_path / "nowhere")}, "cannot load"),
    ]
    build_tiny_lm(tmp_path / "wide", world.texts, hidden_size=96)
    for name, cfg, which, kw, words in cases:
        out = exports / name.replace(" ", "-")
        with pytest.raises(ExportError, match=words):
            export(cfg, which, out, **{"merge": False, "base": None, "force": False, **kw})
        assert not out.exists(), name
        assert leftovers(exports) == [], name

    damaged = CheckpointStore(state / "checkpoints").path(1)
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"does not match its manifest .* damaged"):
        export(config, "1", exports / "damaged", merge=False, base=None, force=False)
    assert not (exports / "damaged").exists() and leftovers(exports) == []


def test_tensors_that_are_not_the_adapter_are_refused() -> None:
    good = {"m.q_proj.lora_A.weight": torch.zeros(4, 8), "m.q_proj.lora_B.weight": torch.zeros(8, 4)}
    check_adapter(good, LORA)
    bad = {
        "not a LoRA weight": {**good, "m.q_proj.weight": torch.zeros(8, 8)},
        "only one of lora_A and lora_B": {"m.q_proj.lora_A.weight": torch.zeros(4, 8)},
        "not finite": {**good, "m.q_proj.lora_B.weight": torch.full((8, 4), float("nan"))},
        "rank-4": {**good, "m.q_proj.lora_A.weight": torch.zeros(2, 8)},
        "no tensors": {},
    }
    for words, tensors in bad.items():
        with pytest.raises(ExportError, match=words):
            check_adapter(tensors, LORA)


def write_aggregator_toml(path: Path, pki: Pki, world: World, state: Path) -> Path:
    d = pki.dir
    path.write_text(
        f'listen = "127.0.0.1:0"\nhealth_listen = "127.0.0.1:0"\nmetrics_listen = ""\nstate_dir = "{state}"\n'
        f'[tls]\ncert = "{d.cert("aggregator")}"\nkey = "{d.key("aggregator")}"\nca = "{d.ca_cert}"\n'
        f'[federation]\nmodel_id = "{world.model}"\nlora_rank = 4\nlora_alpha = 8.0\n'
        'target_modules = ["q_proj", "v_proj"]\n'
    )
    return path


def test_the_aggregator_command_exports_and_exits_2_on_a_refusal(
    world: World, pki: Pki, tmp_path: Path
) -> None:
    make_state(world, tmp_path / "state")
    toml = write_aggregator_toml(tmp_path / "aggregator.toml", pki, world, tmp_path / "state")
    done = run_cli("server.cli", "--config", str(toml), "export", "--out", str(tmp_path / "out"), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported global version 1 (the lowest token-weighted eval loss (5.1400 ± 0.04)" in done.stdout
    refused = run_cli(
        "server.cli", "--config", str(toml), "export", "--out", str(tmp_path / "o2"), "--version", "9"
    )
    assert refused.returncode == 2
    assert "cloudfed-aggregator: no global version 9 (on disk: 0..2)" in refused.stderr
    assert not (tmp_path / "o2").exists()


async def test_an_agent_exports_the_version_it_downloads(
    world: World, pki: Pki, tmp_path: Path, start_aggregator
) -> None:
    """The agent's command against a real aggregator over mTLS: the latest version, downloaded and
    verified, written with merged weights; a version the aggregator does not have is refused."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = await start_aggregator(adapter=world.versions[2], config=config_for(pki, world, tmp_path / "agg0"))
    files = pki.agent("exporter", cloud="gcp")
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'aggregator = "{run.target}"\nserver_name = "localhost"\nstate_dir = "{tmp_path / "agent-state"}"\n'
        f'model = "{world.model}"\n[tls]\ncert = "{files.cert}"\nkey = "{files.key}"\nca = "{files.ca}"\n'
    )
    out = tmp_path / "out"
    done = await asyncio.to_thread(
        run_cli, "agent.cli", "--config", str(toml), "export", "--out", str(out), "--merge", timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"exported global version 0 (sha256 verified) to {out}" in done.stdout
    saved = load_file(out / ADAPTER_WEIGHTS)
    assert all(torch.equal(saved[k], world.versions[2][k]) for k in world.versions[2])
    record = json.loads((out / PROVENANCE).read_text())
    served = CheckpointStore(tmp_path / "agg0" / "checkpoints").manifest(0)
    assert record["checkpoint_sha256"] == served.sha256 and record["downloaded_by"].endswith(
        "/agent/exporter"
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world.model), str(out))
    ids = sample_ids(world)
    torch.testing.assert_close(logits(merged, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)
    assert not any((tmp_path / "agent-state").glob(".export.*"))  # the download went with its temp dir

    refused = await asyncio.to_thread(
        run_cli, "agent.cli", "--config", str(toml), "export", "--out", str(tmp_path / "o2"), "--version", "3"
    )
    assert refused.returncode == 1 and "NOT_FOUND" in refused.stderr, refused.stderr
    assert not (tmp_path / "o2").exists()
    shutil.rmtree(out)
