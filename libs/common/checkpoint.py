"""The checkpoint hand-off format shared by the trainer (writer) and serving
(reader): atomic publication and a manifest of sha256 digests.

A checkpoint is a directory `checkpoint-<step>` under a run directory. It is
built in a hidden temporary sibling, every file and the directory fsynced,
then renamed into place, so a reader sees either nothing or all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Callable

from libs.common.errors import FailedPrecondition, NotFound

MANIFEST = "manifest.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: pathlib.Path) -> dict:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[str(path.relative_to(directory))] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {"format": "tuneforge.checkpoint/v1", "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def publish(final_dir: str | pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Runs `build(tmp_dir)` to fill a temporary directory, writes its manifest,
    fsyncs everything and renames it to `final_dir`. An existing `final_dir`
    is replaced (moved aside first, then removed)."""
    final_dir = pathlib.Path(final_dir).resolve()
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        write_manifest(tmp)
        for path in tmp.rglob("*"):
            _fsync(path)
        _fsync(tmp)
        old = None
        if final_dir.exists():
            old = parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final_dir, old)
        os.rename(tmp, final_dir)
        _fsync(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def verify(directory: str | pathlib.Path) -> dict:
    """Checks every file against the manifest; raises NotFound or FailedPrecondition naming the file."""
    directory = pathlib.Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise NotFound(f"{directory} has no {MANIFEST}", field="path")
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise FailedPrecondition(f"{path} is listed in {MANIFEST} but missing", field="path")
        if sha256_file(path) != entry["sha256"]:
            raise FailedPrecondition(f"{path}: sha256 does not match {MANIFEST}", field="path")
    return manifest


def step_of(path: str | pathlib.Path) -> int | None:
    match = _STEP.match(pathlib.Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Published checkpoints of a run, oldest first (temporary directories are hidden)."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of)


def resolve_adapter_dir(path: str | pathlib.Path) -> pathlib.Path:
    """An adapter directory, or a run directory whose newest checkpoint is one."""
    path = pathlib.Path(path)
    if (path / "adapter_config.json").is_file():
        return path
    found = checkpoints(path)
    if found and (found[-1] / "adapter_config.json").is_file():
        return found[-1]
    raise NotFound(f"{path} is neither a LoRA adapter directory nor a run directory with checkpoints", field="adapters")
