"""Regenerate eventbus/_generated from protos/**/*.proto (protobuf messages + grpclib stubs).

protos/mq.proto becomes mq_pb2.py and mq_grpc.py; protos/eventbus/v2/eventbus.proto becomes
v2_pb2.py and v2_grpc.py (flat names, relative imports: the proto package eventbus.v2 must not
be looked up as the Python package eventbus).

Usage: python scripts/generate_protos.py [OUTPUT_DIR]
"""

import os
import pathlib
import re
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
HEADER = "# Generated from protos/{name} by scripts/generate_protos.py. Do not edit.\n"
FLAT_NAMES = {"mq.proto": "mq", "eventbus/v2/eventbus.proto": "v2"}


def generate(out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    bin_dir = pathlib.Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    for proto, flat in FLAT_NAMES.items():
        with tempfile.TemporaryDirectory() as scratch:
            _protoc(PROTOS / proto, pathlib.Path(scratch))
            _flatten(pathlib.Path(scratch), proto, flat, out_dir)


def _protoc(proto: pathlib.Path, out_dir: pathlib.Path) -> None:
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


def _flatten(scratch: pathlib.Path, proto: str, flat: str, out_dir: pathlib.Path) -> None:
    """Move protoc's output to flat names in out_dir, importing each other relatively."""
    stem = proto.removesuffix(".proto")
    dotted = stem.replace("/", ".")
    for suffix in ("_pb2.py", "_pb2.pyi", "_grpc.py"):
        text = (scratch / f"{stem}{suffix}").read_text()
        text = re.sub(
            rf"^import {re.escape(dotted)}_pb2$", f"from . import {flat}_pb2", text, flags=re.M
        )
        text = text.replace(f"{dotted}_pb2.", f"{flat}_pb2.")
        (out_dir / f"{flat}{suffix}").write_text(HEADER.format(name=proto) + text)


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "eventbus" / "_generated")
