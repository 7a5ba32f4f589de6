"""Regenerate backend_pb2.py and backend_pb2_grpc.py from backend.proto with grpcio-tools.

Run from anywhere: `python -m runtime.proto.build` (writes next to the .proto), or
`python -m runtime.proto.build OUTDIR` (writes `OUTDIR/runtime/proto/…`, used by the test that
checks the committed files are what the .proto generates). The .proto is compiled by its path from
the repository root, so the generated gRPC module imports `runtime.proto.backend_pb2` (a package
import) rather than a bare `backend_pb2`; the wire names (`backend.Backend/…`) come from the
`package` line and do not depend on that path.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO = Path(__file__).with_name("backend.proto")
ROOT = PROTO.parents[2]
RELATIVE = PROTO.relative_to(ROOT).as_posix()
GENERATED = ("backend_pb2.py", "backend_pb2.pyi", "backend_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Compile the .proto into out_root (mirroring runtime/proto/); returns the generated files."""
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / PROTO.parent.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"--pyi_out={out_root}",  # type stubs: the message classes are built at run time
            RELATIVE,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed on {RELATIVE} (exit {code})")
    return [out_root / PROTO.parent.relative_to(ROOT) / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    """Entry point: regenerate in place, or into the folder given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    out_root = Path(args[0]) if args else ROOT
    for path in generate(out_root):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
