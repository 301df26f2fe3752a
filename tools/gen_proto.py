"""Generate the Python stubs in moesaic/proto/ from proto/moesaic/v1/*.proto.

    python tools/gen_proto.py            # regenerate in place
    python tools/gen_proto.py --out DIR  # write elsewhere (the staleness test compares)

protoc writes flat ``import x_pb2`` lines; they are rewritten to package imports so the
stubs work as ``moesaic.proto.x_pb2``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto" / "moesaic" / "v1"
STUBS = ROOT / "moesaic" / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # dev extra

    # protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    names = [p.stem for p in protos]
    written = []
    for path in sorted(out.glob("*_pb2*.py*")):
        text = path.read_text()
        for name in names:
            text = re.sub(
                rf"^import {name}_pb2 as", f"from moesaic.proto import {name}_pb2 as", text, flags=re.M
            )
        path.write_text(text)
        written.append(path)
    init = out / "__init__.py"
    init.write_text('"""Generated gRPC stubs (tools/gen_proto.py). Do not edit."""\n')
    return [init, *written]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=STUBS)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out == STUBS else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
