"""Bit packing (common/bitpack): exact round trips at every width, sizes, refusals."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import bitpack
from common.errors import InvalidArgument


@given(width=st.integers(1, 32), count=st.integers(0, 700), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=120, deadline=None)
def test_round_trip_is_exact_and_tight(width: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << width, count, dtype=np.uint64).astype(np.uint32)
    packed = bitpack.pack(values, width)
    assert len(packed) == bitpack.packed_bytes(count, width) == (count * width + 7) // 8
    np.testing.assert_array_equal(bitpack.unpack(packed, width, count), values)


@pytest.mark.parametrize("width", [3, 13, 21, 24])
def test_many_blocks_and_high_bits_dropped(width: int) -> None:
    count = 2 * bitpack.BLOCK + 77  # crosses block boundaries mid-group
    values = np.random.default_rng(width).integers(0, 1 << 32, count, dtype=np.uint64).astype(np.uint32)
    unpacked = bitpack.unpack(bitpack.pack(values, width), width, count)
    np.testing.assert_array_equal(unpacked, values & np.uint32((1 << width) - 1))


def test_wrong_sizes_and_widths_are_refused() -> None:
    packed = bitpack.pack(np.arange(10, dtype=np.uint32), 5)
    with pytest.raises(InvalidArgument, match="packed bytes"):
        bitpack.unpack(packed[:-1], 5, 10)
    with pytest.raises(InvalidArgument, match="width"):
        bitpack.pack(np.arange(3, dtype=np.uint32), 33)
