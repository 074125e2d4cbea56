"""Writes OCI image layers and image archives byte-for-byte reproducibly: the build step behind //bazel:oci.bzl.

No container engine is needed (none runs on the build machines): a layer is a tar
whose entries are sorted, owned by root (or the uid given), dated 0 and gzipped
with no name or time in the header, so the same files always give the same
digests; an image is an `oci-archive` (oci-layout, index.json, blobs/sha256/...)
that `podman load`, `skopeo inspect oci-archive:` and `skopeo copy` accept.

    python -m deploy.images.oci layer --out L.tar.gz --meta L.json --records R1 R2 ... --prefix opt/venv/...
    python -m deploy.images.oci layer --out L.tar.gz --meta L.json --files DEST=SRC ...
    python -m deploy.images.oci meta --layer base.tar.gz --meta base.json
    python -m deploy.images.oci image --out image.tar --config config.json --layer L.tar.gz=L.json ...
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import pathlib
import stat
import sys
import tarfile
import zlib

# Level 1: the Python layers hold ~4 GB of mostly-compressed .so files; level 6 costs
# several times the CPU for a few per cent less on these 2-core builders.
COMPRESSLEVEL = 1
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class LayerError(Exception):
    """A layer input that cannot be read as declared (names the file)."""


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `inner`."""

    def __init__(self, inner):
        self.inner, self.sha, self.size = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def record_files(record: pathlib.Path, prefix: str) -> dict[str, pathlib.Path]:
    """The files a dist-info RECORD installs inside site-packages, as {path in image: path on disk}.

    Bytecode and entries outside site-packages (console scripts in ../../../bin) stay out:
    the image runs its code through the interpreter, and bytecode written by this
    machine's Python would embed source mtimes that the layer sets to 0."""
    site_packages = pathlib.Path(os.path.realpath(record)).parent.parent
    files = {}
    with open(record, newline="") as handle:
        for line, row in enumerate(csv.reader(handle), 1):
            if not row or not row[0]:
                continue
            name = row[0]
            if name.startswith(("..", "/")) or "__pycache__/" in name or name.endswith(".pyc"):
                continue
            source = site_packages / name
            if not source.is_file():
                raise LayerError(f"{record}:{line}: {name} is listed but not installed at {source}")
            files[f"{prefix.strip('/')}/{name}"] = source
    return files


def write_layer(files: dict[str, pathlib.Path], out: pathlib.Path, uid: int = 0) -> dict:
    """Writes `files` ({path in image: source}) as a reproducible gzipped tar; returns its digests."""
    names = set(files)
    directories = sorted({parent for name in names for parent in _parents(name)} - names)
    with open(out, "wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=COMPRESSLEVEL) as gz:
            plain = _Hashing(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                entries = [(d, None) for d in directories] + [(n, files[n]) for n in names]
                for name, source in sorted(entries):
                    info = tarfile.TarInfo(name)
                    info.uid = info.gid = uid
                    info.uname = info.gname = ""
                    info.mtime = 0
                    if source is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(info)
                        continue
                    try:
                        status = os.stat(source)
                    except OSError as exc:
                        raise LayerError(f"{source}: {exc.strerror}") from exc
                    info.mode = 0o755 if status.st_mode & stat.S_IXUSR else 0o644
                    info.size = status.st_size
                    with open(source, "rb") as handle:
                        tar.addfile(info, handle)
    return {"digest": "sha256:" + compressed.sha.hexdigest(), "diff_id": "sha256:" + plain.sha.hexdigest(),
            "size": compressed.size, "uncompressed_size": plain.size}


def layer_meta(layer: pathlib.Path) -> dict:
    """Digests of an existing gzipped layer (the debootstrap base, made outside Bazel)."""
    compressed, plain = hashlib.sha256(), hashlib.sha256()
    size = uncompressed = 0
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(layer, "rb") as handle:
        while chunk := handle.read(1 << 20):
            compressed.update(chunk)
            size += len(chunk)
            data = inflate.decompress(chunk)
            plain.update(data)
            uncompressed += len(data)
    data = inflate.flush()
    plain.update(data)
    return {"digest": "sha256:" + compressed.hexdigest(), "diff_id": "sha256:" + plain.hexdigest(),
            "size": size, "uncompressed_size": uncompressed + len(data)}


def _blob(data: bytes) -> tuple[str, bytes]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def _json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_image(out: pathlib.Path, config: dict, layers: list[tuple[pathlib.Path, dict]], ref: str,
                annotations: dict | None = None) -> dict:
    """Writes an oci-archive of one image: `config` holds the image config's `config` part
    (Entrypoint, Env, User, Labels, ...); the rootfs and history come from `layers`."""
    image_config = {
        "architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [meta["diff_id"] for _, meta in layers]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": meta.get("name", path.name)}
                    for path, meta in layers],
    }
    config_digest, config_bytes = _blob(_json(image_config))
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": meta["digest"], "size": meta["size"]}
                   for _, meta in layers],
        "annotations": dict(sorted((annotations or {}).items())),
    }
    manifest_digest, manifest_bytes = _blob(_json(manifest))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": manifest["mediaType"], "digest": manifest_digest,
                            "size": len(manifest_bytes),
                            "annotations": {"org.opencontainers.image.ref.name": ref}}]}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        _add_bytes(tar, "index.json", _json(index))
        for digest, data in ((config_digest, config_bytes), (manifest_digest, manifest_bytes)):
            _add_bytes(tar, "blobs/sha256/" + digest.split(":")[1], data)
        seen = set()
        for path, meta in layers:
            if meta["digest"] in seen:
                continue
            seen.add(meta["digest"])
            info = tarfile.TarInfo("blobs/sha256/" + meta["digest"].split(":")[1])
            info.size, info.mtime, info.mode = os.path.getsize(path), 0, 0o644
            if info.size != meta["size"]:
                raise LayerError(f"{path}: {info.size} bytes, but its metadata says {meta['size']}")
            with open(path, "rb") as handle:
                tar.addfile(info, handle)
    return {"ref": ref, "manifest": manifest_digest, "config": config_digest,
            "size": sum(meta["size"] for _, meta in layers) + len(config_bytes) + len(manifest_bytes),
            "layers": [{"name": meta.get("name", path.name), "digest": meta["digest"], "size": meta["size"]}
                       for path, meta in layers]}


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _print_summary(ref: str, summary: dict) -> None:
    print(f"{ref}: {_human(summary['size'])} compressed, manifest {summary['manifest']}")
    for entry in summary["layers"]:
        print(f"  {entry['digest'][:19]}  {_human(entry['size']):>10}  {entry['name']}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.images.oci", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    layer = commands.add_parser("layer", help="write a layer from dist-info RECORDs or DEST=SRC files")
    layer.add_argument("--out", required=True)
    layer.add_argument("--meta", required=True)
    layer.add_argument("--name", default="")
    layer.add_argument("--prefix", default="", help="where the RECORDs' site-packages go in the image")
    layer.add_argument("--records", nargs="*", default=[])
    layer.add_argument("--files", nargs="*", default=[], help="DEST=SRC, DEST relative to /")
    meta = commands.add_parser("meta", help="digests of an existing gzipped layer")
    meta.add_argument("--layer", required=True)
    meta.add_argument("--meta", required=True)
    meta.add_argument("--name", default="")
    image = commands.add_parser("image", help="write an oci-archive from layers and a config")
    image.add_argument("--out", required=True)
    image.add_argument("--config", required=True, help="JSON: the image config's `config` object")
    image.add_argument("--ref", required=True, help="the tag inside the archive, e.g. tuneforge-serving:0.1.0")
    image.add_argument("--layer", action="append", default=[], help="LAYER.tar.gz=META.json, base first")
    image.add_argument("--summary", help="write the digests and sizes here (JSON)")
    sizes = commands.add_parser("sizes", help="print the sizes of built images from their summary JSON files")
    sizes.add_argument("summaries", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.command == "layer":
            files: dict[str, pathlib.Path] = {}
            for record in args.records:
                files.update(record_files(pathlib.Path(record), args.prefix))
            for pair in args.files:
                dest, _, source = pair.partition("=")
                files[dest.strip("/")] = pathlib.Path(source)
            result = {"name": args.name, **write_layer(files, pathlib.Path(args.out))}
            pathlib.Path(args.meta).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        elif args.command == "meta":
            result = {"name": args.name, **layer_meta(pathlib.Path(args.layer))}
            pathlib.Path(args.meta).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        elif args.command == "sizes":
            for path in args.summaries:
                summary = json.loads(pathlib.Path(path).read_text())
                _print_summary(summary["ref"], summary)
        else:
            config = json.loads(pathlib.Path(args.config).read_text())
            layers = []
            for pair in args.layer:
                path, _, meta_path = pair.partition("=")
                layers.append((pathlib.Path(path), json.loads(pathlib.Path(meta_path).read_text())))
            summary = write_image(pathlib.Path(args.out), config["config"], layers, args.ref,
                                  config.get("annotations"))
            if args.summary:
                pathlib.Path(args.summary).write_text(json.dumps(summary, indent=1) + "\n")
            _print_summary(args.ref, summary)
    except (LayerError, OSError, ValueError) as exc:
        print(f"oci: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
