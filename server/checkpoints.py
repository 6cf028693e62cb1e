"""Global model versions as safetensors checkpoints with JSON manifests."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.chunks import sha256_file
from common.durable import fsync_path, replace_durably
from common.errors import NotFound
from common.layout import ParamLayout

_NAME = re.compile(r"^v(\d{8})\.safetensors$")


@dataclass(frozen=True)
class Manifest:
    """What a version is and where it came from."""

    version: int
    parent: int | None
    layout_digest: str
    sha256: str
    size_bytes: int
    participants: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    """A directory of ``vNNNNNNNN.safetensors`` files, each with a ``.json`` manifest.

    A version exists once its manifest is written; files are written to a temp
    name, fsynced and renamed, so a crash never leaves a half version visible.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, version: int) -> Path:
        """The checkpoint file of a version."""
        return self.root / f"v{version:08d}.safetensors"

    def _manifest_path(self, version: int) -> Path:
        return self.root / f"v{version:08d}.json"

    def versions(self) -> list[int]:
        """Committed versions, ascending."""
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and self._manifest_path(int(m[1])).exists():
                found.append(int(m[1]))
        return sorted(found)

    def latest(self) -> int | None:
        """The newest committed version, or None."""
        v = self.versions()
        return v[-1] if v else None

    def manifest(self, version: int) -> Manifest:
        """The manifest of a committed version whose tensors are on disk."""
        try:
            return Manifest(**json.loads(self._manifest_path(version).read_text()))
        except FileNotFoundError:
            if self._pruned_path(version).exists():
                raise NotFound(
                    f"global version {version} was pruned by the aggregator's checkpoint retention "
                    f"([checkpoints]); the latest is {self.latest()}"
                ) from None
            raise NotFound(f"no global version {version}") from None

    def _pruned_path(self, version: int) -> Path:
        return self.root / "pruned" / f"v{version:08d}.json"

    def prune(self, version: int) -> None:
        """Drop a version's tensors and keep its manifest under ``pruned/`` (idempotent). The
        manifest moves first, so from then on the version is gone to readers."""
        manifest = self._manifest_path(version)
        if manifest.exists():
            self._pruned_path(version).parent.mkdir(exist_ok=True)
            os.replace(manifest, self._pruned_path(version))
            fsync_path(self.root)
        self.path(version).unlink(missing_ok=True)

    def pruned(self) -> list[int]:
        """Versions whose tensors were pruned, ascending."""
        folder = self.root / "pruned"
        found = [int(p.stem[1:]) for p in folder.glob("v*.json")] if folder.is_dir() else []
        return sorted(found)

    def half_pruned(self) -> list[int]:
        """Pruned versions whose tensors are still on disk (a crash between the two steps)."""
        return [v for v in self.pruned() if self.path(v).exists()]

    def disk_bytes(self) -> int:
        """Bytes of the tensors on disk."""
        return sum(p.stat().st_size for p in self.root.glob("v*.safetensors"))

    def load(self, version: int) -> dict[str, torch.Tensor]:
        """Tensors of a committed version."""
        self.manifest(version)
        return load_file(self.path(version))

    def save(
        self,
        version: int,
        tensors: Mapping[str, torch.Tensor],
        parent: int | None,
        participants: list[str] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write a new version atomically and return its manifest."""
        if self._manifest_path(version).exists():
            raise FileExistsError(f"version {version} already committed")
        layout = ParamLayout.from_tensors(tensors)
        final = self.path(version)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"version": str(version)})
        fsync_path(Path(tmp))
        os.replace(tmp, final)
        manifest = Manifest(
            version=version,
            parent=parent,
            layout_digest=layout.digest,
            sha256=sha256_file(final).hexdigest(),
            size_bytes=final.stat().st_size,
            participants=participants or [],
            metrics=metrics or {},
        )
        replace_durably(self._manifest_path(version), json.dumps(asdict(manifest), indent=2).encode())
        return manifest
