#!/usr/bin/env python3
"""Regenerate the committed protobuf/gRPC stubs in tessera/proto from proto/tessera/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]

The stubs are committed so that installing Tessera never needs grpcio-tools; tests/test_protos.py
regenerates into a temp dir and fails when the committed copies are stale.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "proto"
DEFAULT_OUT = ROOT / "tessera" / "proto"

# The Workload API is served and called under its standard wire name by hand: no gRPC stubs for it.
NO_GRPC = {"workload.proto"}

HEADER = '"""Generated protobuf and gRPC stubs. Do not edit: run scripts/gen_protos.py."""\n'


def generate(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc  # imported here: only developers need grpcio-tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted((SOURCES / "tessera").glob("*.proto")):
            rel = src.relative_to(SOURCES).as_posix()
            args = ["protoc", f"-I{SOURCES}", f"-I{well_known}", f"--python_out={tmp}", f"--pyi_out={tmp}"]
            if src.name not in NO_GRPC:
                args.append(f"--grpc_python_out={tmp}")
            if protoc.main([*args, rel]) != 0:
                sys.exit(f"protoc failed on {rel}")
        for produced in sorted((Path(tmp) / "tessera").iterdir()):
            text = produced.read_text()
            # protoc writes `from tessera import x_pb2`; the modules live in tessera.proto.
            text = re.sub(r"^from tessera import (\w+_pb2)", r"from tessera.proto import \1", text, flags=re.M)
            (out / produced.name).write_text(text)
    (out / "__init__.py").write_text(HEADER)
    (out / "py.typed").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.out == DEFAULT_OUT and DEFAULT_OUT.exists():
        shutil.rmtree(DEFAULT_OUT)
    generate(args.out)


if __name__ == "__main__":
    main()
