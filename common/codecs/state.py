"""Codec state: a safetensors file of tensors every party of a codec must share (e.g. the eigen
bases), named by its sha256. The aggregator serves it; agents download it once and check the digest.

A tensor equal to another (dtype, shape and values; the bases of layers that read one input) is
stored once: the file's metadata maps each repeated name to the stored one under ``aliases``
(JSON), and reading gives every name, the repeats as the same array."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from common.chunks import sha256_file
from common.errors import ConfigError

ALIASES = "aliases"


def save_state(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> int:
    """Write ``tensors`` to ``path`` (atomically), each distinct one once under the first of its
    names in sorted order; return how many names were stored as aliases."""
    stored: dict[str, np.ndarray] = {}
    first: dict[tuple[str, tuple[int, ...], bytes], str] = {}
    aliases: dict[str, str] = {}
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        key = (array.dtype.str, array.shape, hashlib.sha256(array.data).digest())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            stored[name] = array
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES] = json.dumps(aliases, sort_keys=True)
    part = path.with_name(path.name + ".part")
    save_file(stored, str(part), metadata=meta)
    os.replace(part, path)
    return len(aliases)


@dataclass(frozen=True)
class CodecState:
    """A state file and its digest."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> CodecState:
        """Hash ``path``; ConfigError if it is missing."""
        if not path.is_file():
            raise ConfigError(f"codec state file {path} does not exist")
        return cls(path, sha256_file(path).hexdigest(), path.stat().st_size)

    def tensors(self) -> dict[str, np.ndarray]:
        """The tensors inside, aliases resolved (ConfigError if the file is not safetensors or
        an alias names no stored tensor)."""
        try:
            with safe_open(str(self.path), framework="np") as f:
                metadata = f.metadata() or {}
                names = f.keys()
                tensors: dict[str, np.ndarray] = {name: f.get_tensor(name) for name in names}
        except Exception as exc:
            raise ConfigError(f"codec state {self.path} is not a safetensors file: {exc}") from exc
        try:
            aliases = json.loads(metadata.get(ALIASES, "{}"))
            if not isinstance(aliases, dict):
                raise ValueError("not a JSON object")
            for name, target in aliases.items():
                if target not in tensors or name in tensors:
                    raise ValueError(f"{name!r} -> {target!r}")
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"codec state {self.path}: bad {ALIASES} in its metadata: {exc}") from exc
        return tensors | {name: tensors[target] for name, target in aliases.items()}
