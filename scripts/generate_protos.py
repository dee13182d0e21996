"""Regenerate eventbus/_generated from protos/*.proto (protobuf messages + grpclib stubs).

Usage: python scripts/generate_protos.py [OUTPUT_DIR]
"""

import os
import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
HEADER = "# Generated from protos/{name} by scripts/generate_protos.py. Do not edit.\n"


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = pathlib.Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    for proto in sorted(PROTOS.glob("*.proto")):
        args = [
            "protoc",
            f"-I{PROTOS}",
            f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpclib_python_out={out_dir}",
            str(proto),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto.name}")
        _make_imports_relative(out_dir, proto)


def _make_imports_relative(out_dir: pathlib.Path, proto: pathlib.Path) -> None:
    stem = proto.stem
    for path in out_dir.glob(f"{stem}_*.py*"):
        text = re.sub(
            rf"^import {stem}_pb2$", f"from . import {stem}_pb2", path.read_text(), flags=re.M
        )
        path.write_text(HEADER.format(name=proto.name) + text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "eventbus" / "_generated")
