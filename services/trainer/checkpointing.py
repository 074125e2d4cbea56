"""A training run's directory: OUTPUT_DIR/args.json and logging.jsonl kept current, and
checkpoint-<step> directories published atomically (PEFT adapter or full HF model, args.json,
logging.jsonl, trainer_state.json, training_state.pt, manifest.json) through
libs.common.checkpoint, and what a resume reads back from them. Sharded back ends (ZeRO,
FSDP2) add every rank's own optimizer and parameter shards, written by each rank into the
hidden directory the checkpoint is built in (`stage_shards`), before rank 0 publishes it. The run directory also gets
TensorBoard events (runs/) and loss-curve images (images/), and keeps at most
`save_total_limit` checkpoints (the newest, plus the best by eval loss). Every write that fails
for want of room raises DiskFull naming its path (field output_dir); a failed publication
leaves the checkpoints before it as they were, and a run starting in the directory removes
what a killed one left half-published."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import subprocess
import time
from typing import Any

import torch

from libs.common import checkpoint, disk, faults, logs
from libs.common.errors import FailedPrecondition
from services.trainer import distributed, plots, vocabulary
from services.trainer.tensorboard_events import LOGGING_DIR, EventWriter

LOG = logging.getLogger("tuneforge.trainer.checkpointing")
TRAINING_STATE = "training_state.pt"
PACKAGES = ("torch", "transformers", "peft", "tuneforge")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(where: pathlib.Path = pathlib.Path(__file__).resolve().parent) -> str | None:
    """The revision of the TuneForge checkout this code runs from, if it is one."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def read_logged(checkpoint_dir: pathlib.Path) -> list[dict]:
    """The logged steps a checkpoint carries (its logging.jsonl)."""
    path = pathlib.Path(checkpoint_dir) / "logging.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_state(checkpoint_dir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json, training_state.pt) of a checkpoint. The .pt file is loaded with
    `weights_only`: tensors and plain values, never arbitrary pickled objects."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    state = json.loads((checkpoint_dir / "trainer_state.json").read_text())
    training = torch.load(checkpoint_dir / TRAINING_STATE, map_location="cpu", weights_only=True)
    return state, training


FIELD = "output_dir"  # what a full disk names: the argument that chose where the run writes


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk.writing(path, field=FIELD):
            tmp.write_text(text)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dumps(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


class RunDir:
    """OUTPUT_DIR of one run. `args` is every resolved argument (with `model` the absolute
    base model directory); versions and the git revision are added here."""

    def __init__(self, output_dir: str | pathlib.Path, args: dict[str, Any], logged: list[dict] | None = None):
        self.path = pathlib.Path(output_dir).resolve()
        with disk.writing(self.path, field=FIELD):
            self.path.mkdir(parents=True, exist_ok=True)
        # The run owns its directory: what a killed run left hidden (a half-built checkpoint) goes.
        leftovers = checkpoint.remove_leftovers(self.path)
        if leftovers:
            logs.log(LOG, logging.WARNING, "removed what a killed run left half-published",
                     paths=[str(p) for p in leftovers])
        self.args = {**args, "versions": package_versions(), "git_revision": git_revision()}
        self.logged: list[dict] = list(logged or [])
        _write_atomic(self.path / "args.json", json.dumps(self.args, indent=2, sort_keys=True, default=str) + "\n")
        # A new run starts a new log; a resumed one continues the log of its checkpoint
        # (entries a killed run logged after that checkpoint are dropped: they are retrained).
        _write_atomic(self.path / "logging.jsonl", "".join(_dumps(entry) + "\n" for entry in self.logged))
        self.events = EventWriter(self.path, resumed_step=self.logged[-1]["step"] if self.logged else 0)
        self.save_total_limit = self.args.get("save_total_limit")

    def log(self, entry: dict) -> None:
        """Appends one logged step (or eval result) to OUTPUT_DIR/logging.jsonl (and to every
        later checkpoint) and to the TensorBoard events."""
        self.logged.append(entry)
        with disk.writing(self.path / "logging.jsonl", field=FIELD), open(self.path / "logging.jsonl", "a") as f:
            f.write(_dumps(entry) + "\n")
        with disk.writing(self.path / LOGGING_DIR, field=FIELD):
            self.events.log(entry)

    def write_curves(self) -> None:
        with disk.writing(self.path / plots.IMAGES, field=FIELD):
            plots.write_loss_curves(self.path, self.logged)
        with disk.writing(self.path / LOGGING_DIR, field=FIELD):
            self.events.flush()

    def close(self) -> None:
        """The final loss curves; closes the event files."""
        self.write_curves()
        self.events.close()

    def best_step(self) -> int | None:
        """The step with the lowest eval loss among the published checkpoints' steps."""
        published = {checkpoint.step_of(p) for p in checkpoint.checkpoints(self.path)}
        scored = [(e["eval_loss"], e["step"]) for e in self.logged if "eval_loss" in e and e["step"] in published]
        return min(scored)[1] if scored else None

    def prune(self) -> list[pathlib.Path]:
        """Removes checkpoints beyond `save_total_limit`: keeps the newest N and the best by
        eval loss. Each is renamed to a hidden name first, so a reader sees it whole or not
        at all. Returns the removed checkpoint paths."""
        if not self.save_total_limit:
            return []
        published = checkpoint.checkpoints(self.path)
        keep = set(published[-self.save_total_limit:])
        best = self.best_step()
        if best is not None:
            keep.add(self.checkpoint_dir(best))
        removed = []
        for path in published:
            if path in keep:
                continue
            checkpoint.discard(path)
            removed.append(path)
        return removed

    def checkpoint_dir(self, step: int) -> pathlib.Path:
        return self.path / f"checkpoint-{step}"

    def publish(self, step: int, model, state: dict[str, Any], tokenizer=None,
                training_state: dict[str, Any] | None = None,
                staged: pathlib.Path | None = None, files=None) -> tuple[pathlib.Path, float]:
        """Publishes checkpoint-<step> from a PEFT model (adapter files) or a full model (a
        Hugging Face model directory, loadable on its own when `tokenizer` is given too);
        returns (its path, seconds taken). `state` (step, data cursor, ...) goes to
        trainer_state.json; `training_state` (optimizer, scheduler, RNG: tensors and plain
        values only) to training_state.pt, for an exact resume. `staged` is the directory of
        `stage_shards`, already holding the shards and the model files (`model` is None).
        `files(directory)` writes what a method publishes beside the model (ppo's value_model/)."""
        started = time.perf_counter()
        if faults.ARMED:
            faults.reach("trainer.publish")
        self.write_curves()
        logged = "".join(_dumps(entry) + "\n" for entry in self.logged)

        def build(tmp: pathlib.Path) -> None:
            if model is not None:
                model.save_pretrained(tmp, **vocabulary.save_kwargs(model))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if files is not None:
                files(tmp)
            (tmp / "args.json").write_text(json.dumps(self.args, indent=2, sort_keys=True, default=str) + "\n")
            (tmp / "logging.jsonl").write_text(logged)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            if training_state is not None:
                # through a Python file: a full disk then surfaces as the OSError behind torch's
                # RuntimeError (torch's own file writer keeps no errno)
                with open(tmp / TRAINING_STATE, "wb") as f:
                    torch.save(training_state, f)

        path = checkpoint.publish(self.checkpoint_dir(step), build, field=FIELD, staged=staged)
        seconds = time.perf_counter() - started
        self.prune()
        return path, seconds


def stage_shards(run: RunDir | None, step: int, engine, world) -> pathlib.Path | None:
    """Collective, for sharded back ends: rank 0 (the one with `run`) makes the hidden directory
    checkpoint-<step> is built in; every rank writes its own optimizer and parameter shards
    into it (engine.save_shards), then rank 0 the model files, each parameter gathered in turn
    (engine.write_model). Returns the directory on rank 0 (for RunDir.publish), None on the
    others. Nothing is visible as a checkpoint until rank 0 publishes it; on failure rank 0
    removes it. Every rank must see the same directory: a run directory on a file system the
    nodes do not share is refused here, naming output_dir."""
    staged = distributed.broadcast(checkpoint.stage(run.checkpoint_dir(step), field=FIELD) if run else None, world)
    staged = pathlib.Path(staged)
    try:
        with disk.writing(staged.parent / f"checkpoint-{step}", field=FIELD, context="nothing was published"):
            engine.save_shards(staged, step)
            seen = distributed.gather(sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()),
                                      world)
            if any(files != seen[0] for files in seen):
                partly = sorted(set().union(*map(set, seen)) - set.intersection(*map(set, seen)))
                raise FailedPrecondition(
                    f"{staged.parent}: the ranks do not see the same files there (not on every rank: "
                    f"{', '.join(partly[:3])}): a sharded checkpoint needs an output_dir on a file system every node "
                    "shares", field=FIELD)
            engine.write_model(staged if run else None)
    except BaseException:
        if run is not None:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged if run else None
