"""The checkpoint hand-off format shared by the trainer (writer) and serving
(reader): atomic publication and a manifest of sha256 digests.

A checkpoint is a directory `checkpoint-<step>` under a run directory. It is
built in a hidden temporary sibling (by one process, or by every rank of a
sharded training job: `stage`), every file and the directory fsynced, then
renamed into place by one process, so a reader sees either nothing or all of it. A
publication that fails (a full disk: DiskFull) removes its temporary
directory; one whose process was killed leaves it hidden, for the next run
in that directory to remove (`remove_leftovers`).
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

from libs.common import disk, faults
from libs.common.errors import FailedPrecondition, NotFound

MANIFEST = "manifest.json"
# What only a resume reads (the trainer's optimizer, scheduler and RNG state; written by
# services.trainer.checkpointing): a reader of the weights alone need not hash it.
RESUME_STATE = ("trainer_state.json", "training_state.pt")
_STEP = re.compile(r"^checkpoint-(\d+)$")
# Hidden siblings of a publication: being built, the replaced version moved aside, being removed.
_HIDDEN = re.compile(r"^\.(tmp|old|removed)-(checkpoint-\d+)-[0-9a-f]{8}$")


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


def stage(final_dir: str | pathlib.Path, field: str | None = None) -> pathlib.Path:
    """Creates the hidden temporary sibling a publication of `final_dir` is built in and
    returns it: for writers that fill it in several processes (every rank of a sharded
    training job writes its own files) before one of them calls `publish(..., staged=)`.
    Until then no reader takes it for a checkpoint, and `remove_leftovers` clears it."""
    final_dir = pathlib.Path(final_dir).resolve()
    tmp = final_dir.parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    with disk.writing(final_dir, field=field, context="nothing was published"):
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    return tmp


def publish(final_dir: str | pathlib.Path, build: Callable[[pathlib.Path], None],
            field: str | None = None, staged: pathlib.Path | None = None) -> pathlib.Path:
    """Runs `build(tmp_dir)` to fill a temporary directory, writes its manifest,
    fsyncs everything and renames it to `final_dir`. An existing `final_dir`
    is replaced (moved aside first, then removed). On any failure the temporary
    directory is removed and `final_dir` is as it was; a full disk raises
    DiskFull naming `final_dir` (and `field`, the argument that chose it).
    `staged` is a directory from `stage(final_dir)` that already holds files (the
    manifest covers them too); without it a fresh one is made."""
    final_dir = pathlib.Path(final_dir).resolve()
    parent = final_dir.parent
    tmp = staged or parent / f".tmp-{final_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        with disk.writing(final_dir, field=field, context="nothing was published"):
            if staged is None:
                parent.mkdir(parents=True, exist_ok=True)
                tmp.mkdir()
            _build(final_dir, tmp, build)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def _build(final_dir: pathlib.Path, tmp: pathlib.Path, build: Callable[[pathlib.Path], None]) -> None:
    parent = final_dir.parent
    build(tmp)
    if faults.ARMED:
        faults.reach("checkpoint.built")
    write_manifest(tmp)
    for path in tmp.rglob("*"):
        _fsync(path)
    _fsync(tmp)
    old = None
    if final_dir.exists():
        old = parent / f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final_dir, old)
    try:
        os.rename(tmp, final_dir)
    except BaseException:
        if old is not None:
            os.rename(old, final_dir)
        raise
    _fsync(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def discard(path: pathlib.Path) -> None:
    """Removes a published checkpoint: renamed to a hidden name first, so a reader sees it
    whole or not at all (a process killed midway leaves it hidden, for remove_leftovers)."""
    hidden = path.with_name(f".removed-{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """What publications and removals killed midway left hidden in `run_dir`: half-built
    temporary directories and half-removed checkpoints go. A replaced checkpoint moved aside
    whose replacement never arrived is put back. Only the one process writing the run
    directory may call this. Returns the hidden paths removed or restored."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in sorted(run_dir.iterdir()):
        match = _HIDDEN.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        final = run_dir / match.group(2)
        if match.group(1) == "old" and not final.exists():
            os.rename(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
        found.append(path)
    return found


def verify(directory: str | pathlib.Path, skip: tuple[str, ...] = ()) -> dict:
    """Checks every file against the manifest, but those named in `skip` (files the caller
    never reads); raises NotFound or FailedPrecondition naming the file."""
    directory = pathlib.Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise NotFound(f"{directory} has no {MANIFEST}", field="path")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{manifest_path} is not valid JSON: {exc}", field="path") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                              for e in files.values()):
        raise FailedPrecondition(f"{manifest_path} is not a checkpoint manifest (expected \"files\": "
                                 "{name: {\"sha256\": ...}})", field="path")
    for name, entry in files.items():
        if name in skip:
            continue
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
