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
    return manifest
