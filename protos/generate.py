"""Regenerate the Python code for protos/cloudfed/v1/*.proto.

Run from the repository root: ``python -m protos.generate``. The generated
modules import each other as ``cloudfed.v1.x_pb2``; they live inside the
``protos`` package, so those imports are rewritten to ``protos.cloudfed.v1``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
_IMPORT = re.compile(r"^(from|import) cloudfed\.", re.MULTILINE)


def generate() -> list[Path]:
    """Run protoc for every proto file and fix imports; return the files written."""
    protos = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={PROTO_ROOT}",
        f"--grpc_python_out={PROTO_ROOT}",
        f"--mypy_out={PROTO_ROOT}",
        f"--mypy_grpc_out={PROTO_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(
        p
        for p in PROTO_ROOT.rglob("*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    )
    for path in written:
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"{m.group(1)} protos.cloudfed.", text)
        if fixed != text:
            path.write_text(fixed)
    return written


if __name__ == "__main__":
    for p in generate():
        print(p.relative_to(PROTO_ROOT.parent), file=sys.stderr)
