"""manifest.json of a prepared dataset: written last and atomically, so its
presence means the dataset is complete; read back by whoever serves the shards."""

from __future__ import annotations

import json
import os
import pathlib

from libs.common.errors import FailedPrecondition, NotFound
from services.dataprep.shards import PARTIAL, write_atomic

MANIFEST = "manifest.json"
FORMAT = "tuneforge.dataset/v1"


def write(output_dir: pathlib.Path, manifest: dict) -> pathlib.Path:
    """Writes manifest.json through a temporary file, fsynced, then renamed into place
    (DiskFull naming it when there is no room)."""
    target = output_dir / MANIFEST
    write_atomic(target, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8"), fsync=True)
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return target


def read(dataset_dir: str | pathlib.Path) -> dict:
    """The manifest of a complete dataset; NotFound for no such directory,
    FailedPrecondition when the preparation never completed there."""
    directory = pathlib.Path(dataset_dir)
    if not directory.is_dir():
        raise NotFound(f"{dataset_dir}: no such dataset directory", field="dataset_dir")
    path = directory / MANIFEST
    if not path.is_file():
        if (directory / PARTIAL).is_file():  # a preparation was stopped (killed) midway, or runs elsewhere
            raise FailedPrecondition(f"{dataset_dir}: no {MANIFEST}, only the {PARTIAL} of a preparation that did "
                                     "not complete (stopped midway, or still running in another process); prepare "
                                     "it again", field="dataset_dir")
        raise FailedPrecondition(f"{dataset_dir}: no {MANIFEST}; the preparation has not completed",
                                 field="dataset_dir")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{path}: not valid JSON: {exc}", field="dataset_dir") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("shards"), list):
        raise FailedPrecondition(f"{path}: not a {FORMAT} manifest", field="dataset_dir")
    for index, shard in enumerate(manifest["shards"]):
        problem = shard_problem(shard)
        if problem:
            raise FailedPrecondition(f"{path}: shards[{index}]: {problem}", field="dataset_dir")
    return manifest


def shard_problem(shard) -> str | None:
    """What is wrong with one entry of a manifest's shard list, if anything: readers index its
    `file`, `rows` and `sha256`, so a hand-edited entry must fail here, not there."""
    if not isinstance(shard, dict):
        return f"expected an object with file, rows and sha256; got {type(shard).__name__}"
    for key, kind in (("file", str), ("sha256", str), ("rows", int)):
        value = shard.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key}: expected {'an integer' if kind is int else 'a string'}; got {json.dumps(value)}"
    if shard["rows"] < 0:
        return f"rows: expected 0 or more; got {shard['rows']}"
    name = pathlib.PurePosixPath(shard["file"])
    if name.is_absolute() or len(name.parts) != 1 or name.name in ("", ".", ".."):
        return f"file: expected a file name inside the dataset directory; got {json.dumps(shard['file'])}"
    return None
