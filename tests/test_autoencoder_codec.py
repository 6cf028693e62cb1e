"""The ``autoencoder`` codec (CG-FedLLM): linear-decoder sums, TGAP then FAF training, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.codecs.autoencoder import Autoencoder, BlockAutoencoder, train_autoencoder
from common.errors import ConfigError, InvalidArgument

BLOCK, CODE, NUMEL = 32, 4, 1000


def structured_updates(n: int, seed: int, rank: int = 3) -> list[np.ndarray]:
    """Updates whose blocks live near a few shared directions (as successive LoRA updates do)."""
    rng = np.random.default_rng(seed)
    directions = np.random.default_rng(99).standard_normal((rank, BLOCK))
    blocks = -(-NUMEL // BLOCK)
    return [
        (rng.standard_normal((blocks, rank)) @ directions * rng.uniform(0.01, 1.0))
        .reshape(-1)[:NUMEL]
        .astype(np.float32)
        for _ in range(n)
    ]


def relative_error(codec: Autoencoder, updates: list[np.ndarray]) -> float:
    errs = [np.linalg.norm(codec.decode(codec.encode(u)) - u) / np.linalg.norm(u) for u in updates]
    return float(np.mean(errs))


@pytest.mark.parametrize("linear", [True, False], ids=["linear-decoder", "nonlinear-decoder"])
def test_tgap_then_faf_learn_the_update_structure(linear: bool) -> None:
    torch.manual_seed(0)
    model = BlockAutoencoder(BLOCK, CODE, 64, linear_decoder=linear)
    held_out = structured_updates(4, seed=5)
    untrained = relative_error(Autoencoder(NUMEL, model), held_out)
    tgap = train_autoencoder(model, structured_updates(6, seed=1), steps=300, seed=0)
    codec = Autoencoder(NUMEL, model)
    before_faf = codec.digest()
    assert tgap < 0.1 and relative_error(codec, held_out) < 0.15 < untrained
    faf = train_autoencoder(model, structured_updates(3, seed=2), steps=50, seed=1)  # fine-tune, no reset
    assert faf < 0.1 and Autoencoder(NUMEL, model).digest() != before_faf
    assert codec.ratio(NUMEL) > (BLOCK / CODE) * 0.9
    assert codec.linear is linear


def test_linear_decoder_decodes_sums_of_scaled_codes() -> None:
    torch.manual_seed(1)
    model = BlockAutoencoder(BLOCK, CODE, 64, linear_decoder=True)
    train_autoencoder(model, structured_updates(4, seed=3), steps=50, seed=0)
    codec = Autoencoder(NUMEL, model)
    updates = structured_updates(5, seed=4)
    summed = codec.decode(np.sum([codec.encode(u) for u in updates], axis=0))
    np.testing.assert_allclose(
        summed, np.sum([codec.decode(codec.encode(u)) for u in updates], axis=0), atol=1e-4
    )


def test_nonlinear_decoder_is_not_summable_and_bad_input_is_refused() -> None:
    model = BlockAutoencoder(BLOCK, CODE, 64, linear_decoder=False)
    codec = Autoencoder(NUMEL, model)
    assert not codec.linear and codec.length == -(-NUMEL // BLOCK) * CODE + 1  # codes and the scale
    with pytest.raises(InvalidArgument):
        codec.decode(np.zeros(codec.length - 1, np.float32))
    with pytest.raises(InvalidArgument):
        codec.encode(np.zeros(NUMEL + 1, np.float32))
    with pytest.raises(ConfigError):
        train_autoencoder(model, [], steps=1, seed=0)
