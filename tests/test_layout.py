"""ParamLayout: canonical order, exact round trips, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import InvalidArgument
from common.layout import ParamLayout


def test_layout_is_independent_of_dict_and_file_order(tmp_path) -> None:
    tensors = {"z.lora_A": torch.randn(3, 4), "a.lora_B": torch.randn(4, 3), "m.bias": torch.randn(5)}
    reordered = dict(reversed(list(tensors.items())))
    save_file(tensors, tmp_path / "t.safetensors")
    from_file = load_file(tmp_path / "t.safetensors")
    digests = {ParamLayout.from_tensors(t).digest for t in (tensors, reordered, from_file)}
    assert len(digests) == 1


def test_flatten_unflatten_round_trips_bit_exactly() -> None:
    tensors = {"b": torch.randn(2, 3), "a": torch.randn(7), "c": torch.randn(1, 1, 4).to(torch.bfloat16)}
    layout = ParamLayout.from_tensors(tensors)
    back = layout.unflatten(layout.flatten(tensors))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert torch.equal(back[name], t)
    assert layout.numel == 2 * 3 + 7 + 4


def test_mismatched_tensors_are_refused_by_name() -> None:
    layout = ParamLayout.from_tensors({"a": torch.zeros(3)})
    with pytest.raises(InvalidArgument, match="missing parameter a"):
        layout.flatten({"b": torch.zeros(3)})
    with pytest.raises(InvalidArgument, match="shape"):
        layout.flatten({"a": torch.zeros(4)})
