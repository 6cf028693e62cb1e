"""Codec state: a safetensors file of tensors every party of a codec must share (e.g. the eigen
bases), named by its sha256. The aggregator serves it; agents download it once and check the digest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from common.chunks import sha256_file
from common.errors import ConfigError


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
        """The tensors inside (ConfigError if the file is not safetensors)."""
        try:
            return load_file(str(self.path))
        except Exception as exc:
            raise ConfigError(f"codec state {self.path} is not a safetensors file: {exc}") from exc
