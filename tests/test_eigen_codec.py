"""The ``eigen`` codec (EoRA-style activation eigenspaces) on a real tiny Llama with peft LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.data import pack
from agent.trainer import LoraSpec, LoraTrainer
from common.codecs.eigen import A_SUFFIX, Eigen, activation_covariances, eigen_bases
from common.codecs.projection import random_basis
from common.errors import ConfigError, InvalidArgument
from common.layout import ParamLayout
from common.tinylm import DOMAINS, build_tiny_lm, domain_corpus

LORA = LoraSpec(4, 8.0, ("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraTrainer, ParamLayout, dict]:  # type: ignore[type-arg]
    root: Path = tmp_path_factory.mktemp("eigen")
    public = [doc for domain in DOMAINS for doc in domain_corpus(domain, 15, seed=3)]
    trainer = LoraTrainer(str(build_tiny_lm(root / "model", public)), LORA)
    covariances = activation_covariances(trainer.model, pack(trainer.tokenizer, public, 32))
    return trainer, ParamLayout.from_tensors(trainer.adapter()), covariances


def test_covariances_cover_every_adapted_layer(world) -> None:  # type: ignore[no-untyped-def]
    _, layout, covariances = world
    modules = {e.name.rsplit(".lora_", 1)[0] for e in layout.entries}
    assert set(covariances) == modules and len(modules) == 6  # 3 targets x 2 layers
    for module, (cov_in, cov_out) in covariances.items():
        a = next(e for e in layout.entries if e.name == module + A_SUFFIX)
        assert cov_in.shape == (a.shape[1],) * 2
        np.testing.assert_allclose(cov_in, cov_in.T, atol=1e-9)
        assert np.linalg.eigvalsh(cov_in).min() > -1e-9 and np.linalg.eigvalsh(cov_out).min() > -1e-9


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


def test_keeps_more_of_the_layer_output_change_than_a_random_basis_of_the_same_size(world) -> None:  # type: ignore[no-untyped-def]
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
    within = np.zeros(layout.numel, np.float32)  # an update inside the kept subspaces comes back exactly
    codec = Eigen(layout, bases)
    for entry in layout.entries:
        basis = bases[entry.name]
        block = rng.standard_normal((entry.shape[0], basis.shape[1])) @ basis.T
        if not entry.name.endswith(A_SUFFIX):
            block = basis @ rng.standard_normal((basis.shape[1], entry.shape[1]))
        within[entry.offset : entry.offset + entry.numel] = block.reshape(-1)
    np.testing.assert_allclose(codec.decode(codec.encode(within)), within, atol=1e-4)


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
    assert codec.digest() != Eigen(layout, eigen_bases(layout, covariances, ratio=8)).digest()
