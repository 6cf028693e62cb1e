"""ParamLayout: map a state dict of tensors onto one flat float32 vector and back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.errors import InvalidArgument

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ParamEntry:
    """One tensor of the layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes, dtypes and offsets of the tensors in a flat vector."""

    entries: tuple[ParamEntry, ...]

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ParamLayout:
        """Layout of a state dict, sorted by name so that it never depends on dict or file order."""
        entries, offset = [], 0
        for name in sorted(tensors):
            t = tensors[name]
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype not in _DTYPES:
                raise InvalidArgument(f"parameter {name}: unsupported dtype {dtype}")
            entry = ParamEntry(name, tuple(int(s) for s in t.shape), dtype, offset)
            entries.append(entry)
            offset += entry.numel
        return cls(tuple(entries))

    @property
    def numel(self) -> int:
        """Total number of elements."""
        return sum(e.numel for e in self.entries)

    @property
    def digest(self) -> str:
        """Hex sha256 of the canonical JSON of the layout."""
        canon = json.dumps(
            [[e.name, list(e.shape), e.dtype, e.offset] for e in self.entries], separators=(",", ":")
        )
        return hashlib.sha256(canon.encode()).hexdigest()

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Concatenate ``tensors`` (matching this layout) into a float32 vector."""
        out = np.empty(self.numel, dtype=np.float32)
        for e in self.entries:
            t = tensors.get(e.name)
            if t is None:
                raise InvalidArgument(f"missing parameter {e.name}")
            if tuple(t.shape) != e.shape:
                raise InvalidArgument(f"parameter {e.name}: shape {tuple(t.shape)} != layout {e.shape}")
            out[e.offset : e.offset + e.numel] = t.detach().to(torch.float32).reshape(-1).cpu().numpy()
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        """Split a flat vector back into tensors of the layout's shapes and dtypes."""
        if vector.shape != (self.numel,):
            raise InvalidArgument(f"vector has shape {vector.shape}, layout needs ({self.numel},)")
        return {
            e.name: torch.from_numpy(np.array(vector[e.offset : e.offset + e.numel], dtype=np.float32))
            .reshape(e.shape)
            .to(_DTYPES[e.dtype])
            for e in self.entries
        }
