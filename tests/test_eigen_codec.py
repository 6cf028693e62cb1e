"""The ``eigen`` codec (EoRA-style calibration eigenspaces) on a real tiny Llama with peft LoRA."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from agent.data import pack
from agent.demo import prepare
from agent.eigen_bases import main as make_bases_main
from agent.eigen_bases import make_bases
from agent.trainer import LoraSpec, LoraTrainer
from common.codecs.eigen import (
    A_SUFFIX,
    Eigen,
    adapted_layers,
    calibrated_bases,
    calibration_covariances,
    covariance_bytes,
    covariance_tensors,
    eigen_bases,
    plan_passes,
    top_eigen,
)
from common.codecs.projection import random_basis
from common.codecs.state import CodecState
from common.config import AggregatorConfig, load
from common.errors import ConfigError, InvalidArgument
from common.layout import ParamLayout
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj", "down_proj"))
PUBLIC = [doc for domain in DOMAINS for doc in domain_corpus(domain, 15, seed=3)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraTrainer, ParamLayout, dict]:  # type: ignore[type-arg]
    root: Path = tmp_path_factory.mktemp("eigen")
    trainer = LoraTrainer(str(build_tiny_lm(root / "model", PUBLIC)), LORA)
    covariances = calibration_covariances(trainer.model, pack(trainer.tokenizer, PUBLIC, 32))
    return trainer, ParamLayout.from_tensors(trainer.adapter()), covariances


def test_covariances_cover_every_adapted_layer(world) -> None:  # type: ignore[no-untyped-def]
    _, layout, covariances = world
    modules = {e.name.rsplit(".lora_", 1)[0] for e in layout.entries}
    assert set(covariances) == modules and len(modules) == 6  # 3 targets x 2 layers
    for module, (cov_in, cov_grad) in covariances.items():
        a = next(e for e in layout.entries if e.name == module + A_SUFFIX)
        b = next(e for e in layout.entries if e.name == module + ".lora_B.weight")
        assert cov_in.shape == (a.shape[1],) * 2 and cov_grad.shape == (b.shape[0],) * 2
        np.testing.assert_allclose(cov_in, cov_in.T, atol=1e-9)
        np.testing.assert_allclose(cov_grad, cov_grad.T, atol=1e-9 * np.abs(cov_grad).max())
        assert np.linalg.eigvalsh(cov_in).min() > -1e-9 and np.linalg.eigvalsh(cov_grad).min() > -1e-9
        assert np.trace(cov_grad) > 0


def test_the_output_side_is_the_loss_gradient_covariance(world) -> None:  # type: ignore[no-untyped-def]
    """E[g g^T] with g = d(summed next-token loss)/d(layer output), checked against a plain
    autograd run over the whole graph (outputs retained, ``backward`` from the embeddings)."""
    trainer, _, covariances = world
    model = trainer.model
    blocks = pack(trainer.tokenizer, PUBLIC, 32)
    layers = adapted_layers(model)
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep(name: str, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs[name].append(output)

    hooks = [
        layer.base_layer.register_forward_hook(lambda _m, _i, o, name=name: keep(name, o))
        for name, layer in layers.items()
    ]
    try:
        with model.disable_adapter():
            model.eval()
            for ids in blocks:
                ids = ids[None]
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                out = model(inputs_embeds=embeds, labels=ids)
                (out.loss * (ids.shape[1] - 1)).backward()
    finally:
        for h in hooks:
            h.remove()
        model.train()
    for name, kept in outputs.items():
        g = torch.cat([o.grad.reshape(-1, o.shape[-1]) for o in kept]).double()
        reference = (g.T @ g / len(g)).numpy()
        np.testing.assert_allclose(covariances[name][1], reference, rtol=1e-4, atol=1e-6 * reference.max())


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5))
@settings(max_examples=15, deadline=None)
def test_decode_of_summed_payloads_is_the_sum_of_decodes(world, seed: int, n: int) -> None:  # type: ignore[no-untyped-def]
    _, layout, covariances = world
    codec = Eigen(layout, eigen_bases(layout, covariances, ratio=4))
    updates = np.random.default_rng(seed).standard_normal((n, layout.numel)).astype(np.float32)
    summed = codec.decode(np.sum([codec.encode(u) for u in updates], axis=0))
    np.testing.assert_allclose(
        summed, np.sum([codec.decode(codec.encode(u)) for u in updates], axis=0), atol=1e-4
    )
    assert codec.linear and not codec.biased
    assert 3.5 < codec.ratio(layout.numel) <= 4.5


def test_keeps_more_of_what_the_output_and_loss_use_than_a_random_basis_of_the_same_size(world) -> None:  # type: ignore[no-untyped-def]
    _, layout, covariances = world
    bases = eigen_bases(layout, covariances, ratio=8)
    rng = np.random.default_rng(0)
    for name, basis in bases.items():
        if not name.endswith(A_SUFFIX):
            continue
        cov_in = covariances[name[: -len(A_SUFFIX)]][0]
        delta = rng.standard_normal((LORA.rank, cov_in.shape[0]))

        def lost(q: np.ndarray, delta: np.ndarray = delta, cov: np.ndarray = cov_in) -> float:
            err = delta - delta @ q @ q.T  # what the layer output loses: E ||err x||^2 = tr(err C err^T)
            return float(np.trace(err @ cov @ err.T))

        random_q = random_basis(cov_in.shape[0], basis.shape[1], seed=1)
        assert lost(basis) < 0.8 * lost(random_q), name
    for name, basis in bases.items():  # lora_B: what the loss loses, E ||err^T g||^2 = tr(err^T G err)
        if name.endswith(A_SUFFIX):
            continue
        cov_grad = covariances[name.removesuffix(".lora_B.weight")][1]
        delta = rng.standard_normal((cov_grad.shape[0], LORA.rank))

        def lost_b(q: np.ndarray, delta: np.ndarray = delta, cov: np.ndarray = cov_grad) -> float:
            err = delta - q @ q.T @ delta
            return float(np.trace(err.T @ cov @ err))

        random_q = random_basis(cov_grad.shape[0], basis.shape[1], seed=1)
        assert lost_b(basis) < 0.8 * lost_b(random_q), name
    within = np.zeros(layout.numel, np.float32)  # an update inside the kept subspaces comes back exactly
    codec = Eigen(layout, bases)
    for entry in layout.entries:
        basis = bases[entry.name]
        block = rng.standard_normal((entry.shape[0], basis.shape[1])) @ basis.T
        if not entry.name.endswith(A_SUFFIX):
            block = basis @ rng.standard_normal((basis.shape[1], entry.shape[1]))
        within[entry.offset : entry.offset + entry.numel] = block.reshape(-1)
    np.testing.assert_allclose(codec.decode(codec.encode(within)), within, atol=1e-4)


def test_top_eigen_says_what_share_of_the_variance_the_kept_directions_hold() -> None:
    rotation = random_basis(4, 4, seed=3)
    covariance = rotation @ np.diag([4.0, 3.0, 2.0, 1.0]) @ rotation.T
    basis, share = top_eigen(covariance, 2)
    assert share == pytest.approx(0.7)
    np.testing.assert_allclose(np.abs(basis.T @ rotation[:, :2]), np.eye(2), atol=1e-5)
    assert top_eigen(np.zeros((3, 3)), 1)[1] == 1.0  # nothing to lose


def test_bad_bases_and_payloads_are_refused(world) -> None:  # type: ignore[no-untyped-def]
    _, layout, covariances = world
    codec = Eigen(layout, eigen_bases(layout, covariances, ratio=4))
    with pytest.raises(InvalidArgument):
        codec.decode(np.zeros(codec.length + 1, np.float32))
    with pytest.raises(InvalidArgument):
        codec.encode(np.zeros(layout.numel - 1, np.float32))
    with pytest.raises(ConfigError):
        eigen_bases(layout, covariances, ratio=0.5)
    first = layout.entries[0].name
    with pytest.raises(ConfigError, match="does not fit"):
        Eigen(layout, {first: np.zeros((3, 2), np.float32)})
    nan = eigen_bases(layout, covariances, ratio=4)
    nan[first][0, 0] = np.nan
    with pytest.raises(ConfigError, match="not finite"):
        Eigen(layout, nan)
    overflowed = dict(covariances)
    module = first.rsplit(".lora_", 1)[0]
    overflowed[module] = (covariances[module][0] * np.inf, covariances[module][1])
    with pytest.raises(ConfigError, match="covariance is not finite"):
        eigen_bases(layout, overflowed, ratio=4)
    assert codec.digest() != Eigen(layout, eigen_bases(layout, covariances, ratio=8)).digest()


def test_passes_within_a_memory_budget_give_the_bases_of_one_pass(world) -> None:  # type: ignore[no-untyped-def]
    """The operator's tool takes the covariances in passes that each hold what the budget allows
    (a real model's would not fit at once): passes in forward order, every layer once, each
    backward going no further than the pass's first layer, and the same bases as a single pass."""
    trainer, layout, covariances = world
    model = trainer.model
    layers = adapted_layers(model)
    names = list(layers)
    assert names == sorted(names, key=lambda n: (int(n.split(".layers.")[1].split(".")[0]), 0)), names
    budget = 2 * max(covariance_bytes(layer) for layer in layers.values())
    passes = plan_passes(model, budget)
    assert [n for p in passes for n in p] == names and 1 < len(passes) < len(names)
    assert all(sum(covariance_bytes(layers[n]) for n in p) <= budget for p in passes)
    assert plan_passes(model, 1) == [[n] for n in names]  # a layer over the budget: a pass of its own
    assert plan_passes(model, 1 << 40) == [names]

    blocks = pack(trainer.tokenizer, PUBLIC, 32)
    traced = []  # whether layer 0's output is in the backward's graph
    decoder = model.base_model.model.model.layers
    hook = decoder[0].register_forward_hook(lambda _m, _i, o: traced.append(o[0].requires_grad))
    model.train()
    try:
        second = covariance_tensors(model, blocks, [n for n in names if ".layers.1." in n], batch_size=4)
        assert traced and not any(traced) and model.training  # the mode is restored
        assert set(second) == {n for n in names if ".layers.1." in n}
        traced.clear()
        covariance_tensors(model, blocks[:1], [names[0]])
        assert traced == [True]
    finally:
        hook.remove()
    batched = covariance_tensors(model, blocks, batch_size=5)
    for name, (cov_in, cov_grad) in covariances.items():  # the fixture's: one block a forward
        np.testing.assert_allclose(batched[name][0].numpy(), cov_in, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batched[name][1].numpy(), cov_grad, rtol=1e-4, atol=1e-6 * cov_grad.max())

    seen: list[tuple[int, int]] = []
    bases = calibrated_bases(
        model, layout, blocks, 4, budget, 5, lambda done, total, _: seen.append((done, total))
    )
    assert seen == [(i + 1, len(passes)) for i in range(len(passes))]
    single = eigen_bases(layout, batched, 4)
    assert bases.keys() == single.keys() == {e.name for e in layout.entries}
    for name, basis in bases.items():
        np.testing.assert_array_equal(basis, single[name])
    with pytest.raises(ConfigError, match="no adapted layer"):
        covariance_tensors(model, blocks, ["base_model.model.lm_head"])


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_the_operator_tool_makes_bases_from_a_4_bit_base_in_passes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``python -m agent.eigen_bases --precision nf4 --memory-gb ...``: the demo's aggregator config
    and calibration text; the bases fit the federation's layout and span nearly the subspaces of
    the float32 base's (which the demo made); text too short for one block is a clear error."""
    config, _, _ = prepare(tmp_path, 1, codec="eigen", codec_ratio=4)
    reference = CodecState.of(tmp_path / "eigen-bases.safetensors").tensors()
    out = tmp_path / "nf4-bases.safetensors"
    argv = ["--config", str(config), "--calibration", str(tmp_path / "calibration.txt"), "--ratio", "4"]
    argv += ["--sequence-length", "64", "--precision", "nf4", "--memory-gb", "0.000001", "--batch-size", "3"]
    with caplog.at_level(logging.INFO, logger="cloudfed.eigen_bases"):
        make_bases_main([*argv, "--out", str(out)])
    passes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pass ")]
    assert len(passes) == 14 and passes[-1].startswith(
        "pass 14/14: 1 layer up to model.layers.1.mlp.down_proj"
    )
    bases = CodecState.of(out).tensors()
    assert bases.keys() == reference.keys()
    for name, basis in bases.items():
        assert basis.shape == reference[name].shape, name
        k = basis.shape[1]
        overlap = np.linalg.norm(basis.T.astype(np.float32) @ reference[name]) ** 2 / k  # 1: one subspace
        assert overlap > 0.8, (name, overlap)

    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(SystemExit, match="fewer than one block of 64"):
        make_bases_main([*argv[:3], str(tmp_path / "short.txt"), *argv[4:], "--out", str(tmp_path / "x")])


def test_the_operator_tool_stores_float16_bases_once_per_input(tmp_path: Path) -> None:
    """By default the tool writes float16 bases and stores the bases of layers that read one input
    (q, k and v's lora_A; gate and up's) once, whatever its passes: the file is under half the
    float32 one's, and the codec it makes decodes within 1e-3 of the float32 bases' codec."""
    config, _, _ = prepare(tmp_path, 1, codec="eigen", codec_ratio=4)  # the tool's defaults, one pass
    half = tmp_path / "eigen-bases.safetensors"
    full = tmp_path / "float32.safetensors"
    exact = make_bases(
        load(AggregatorConfig, config),
        str(tmp_path / "model"),
        tmp_path / "calibration.txt",
        4,
        64,
        full,
        memory_bytes=1,  # a pass a layer
        dtype="float32",
    )

    layers = [f"base_model.model.model.layers.{i}" for i in range(2)]
    repeats = {  # stored once under k_proj's and gate_proj's names (the first in sorted order)
        f"{layer}.{module}.lora_A.weight"
        for layer in layers
        for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")
    }
    for path in (half, full):
        with safe_open(str(path), framework="np") as f:
            aliases = json.loads(f.metadata()["aliases"])
            assert set(aliases) == repeats and not repeats & set(f.keys()), path
            kept = f.metadata()["kept"]  # what the operator is told the bases keep
            assert re.fullmatch(
                r"\d+% of the input's variance in lora_A \(median; least \d+%, [a-z_.\d]+\.lora_A\); "
                r"\d+% of the loss gradient's variance in lora_B \(median; least \d+%, [a-z_.\d]+\.lora_B\)",
                kept,
            ), kept
    assert half.stat().st_size < 0.55 * full.stat().st_size
    f16, f32 = CodecState.of(half).tensors(), CodecState.of(full).tensors()
    assert f16.keys() == f32.keys() and len(f16) == 28
    for name, basis in f32.items():
        assert basis.dtype == np.float32 and f16[name].dtype == np.float16
        np.testing.assert_array_equal(f16[name], basis.astype(np.float16))
    q, k = (f"{layers[0]}.self_attn.{m}_proj.lora_A.weight" for m in "qk")
    assert f16[q] is f16[k]  # one array in memory too

    small = Eigen(exact.layout, f16)
    assert small.bases[q] is small.bases[k] and small.length == exact.length
    assert small.digest() != exact.digest() == Eigen(exact.layout, f32).digest()
    updates = np.random.default_rng(0).standard_normal((4, exact.layout.numel)).astype(np.float32)
    decoded = small.decode(np.sum([small.encode(u) for u in updates], axis=0))
    reference = exact.decode(np.sum([exact.encode(u) for u in updates], axis=0))
    error = np.linalg.norm(decoded - reference) / np.linalg.norm(reference)
    print(f"float16 bases: decoded sum within {error:.1e} of float32's")
    assert 0 < error < 1e-3
