"""The one proto codegen step: generates Python messages, gRPC stubs and type stubs.

Used by the pip install (`make` runs it in place, next to each .proto) and by
Bazel (a genrule runs it with --out_dir). Proto files are compiled with the
repository root as include path, so generated modules import as
`protos.tuneforge.<service>.v1.<name>_pb2`: the import path is the file path.
"""

import argparse
import pathlib
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def proto_files(root: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "protos").rglob("*.proto"))


def generate(out_dir: pathlib.Path, root: pathlib.Path = ROOT, files: list[str] | None = None) -> None:
    files = files or proto_files(root)
    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{root}",
        f"-I{wkt}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {' '.join(files)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(ROOT), help="root of the generated tree (default: in place)")
    parser.add_argument("--root", default=str(ROOT), help="include root holding protos/")
    parser.add_argument("files", nargs="*", help="proto files relative to --root (default: all)")
    args = parser.parse_args(argv)
    generate(pathlib.Path(args.out_dir), pathlib.Path(args.root), args.files or None)


if __name__ == "__main__":
    main(sys.argv[1:])
