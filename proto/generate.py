"""Regenerate the Python stubs from the .proto files beside this script.

    python proto/generate.py            # write into proto/
    python proto/generate.py --out DIR  # write elsewhere (the staleness test does this)

grpc_tools emits absolute imports between generated modules (``import x_pb2``); we
rewrite them to package-relative ones so the stubs import as ``edgeserve.proto.x_pb2``,
and register the descriptors in ``edgeserve.proto.POOL`` instead of the default pool.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
_IMPORT_RE = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
# tritonclient (and any other KServe stub) registers the same `inference.*` symbols in
# protobuf's default pool; ours live in a private pool so both can share one process.
_DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = "__import__('edgeserve.proto', fromlist=['POOL']).POOL.AddSerializedFile("


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(p.name for p in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.glob("*_pb2*.py")) + sorted(out.glob("*_pb2.pyi")):
        text = _IMPORT_RE.sub(r"from . import \1 as \2", path.read_text())
        text = text.replace(_DEFAULT_POOL, _PRIVATE_POOL)
        path.write_text(text)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR)
    for path in generate(parser.parse_args().out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
