"""A training run's directory: OUTPUT_DIR/args.json and logging.jsonl kept current, and
checkpoint-<step> directories published atomically (PEFT adapter, args.json,
logging.jsonl, trainer_state.json, manifest.json) through libs.common.checkpoint."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import time
from typing import Any

from libs.common import checkpoint

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


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dumps(entry: dict) -> str:
    return json.dumps(entry, sort_keys=True, default=str)


class RunDir:
    """OUTPUT_DIR of one run. `args` is every resolved argument (with `model` the absolute
    base model directory); versions and the git revision are added here."""

    def __init__(self, output_dir: str | pathlib.Path, args: dict[str, Any]):
        self.path = pathlib.Path(output_dir).resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.args = {**args, "versions": package_versions(), "git_revision": git_revision()}
        self.logged: list[dict] = []
        _write_atomic(self.path / "args.json", json.dumps(self.args, indent=2, sort_keys=True, default=str) + "\n")
        # A new run starts a new log; a later resume will continue one instead.
        _write_atomic(self.path / "logging.jsonl", "")

    def log(self, entry: dict) -> None:
        """Appends one logged step to OUTPUT_DIR/logging.jsonl (and to every later checkpoint)."""
        self.logged.append(entry)
        with open(self.path / "logging.jsonl", "a") as f:
            f.write(_dumps(entry) + "\n")

    def checkpoint_dir(self, step: int) -> pathlib.Path:
        return self.path / f"checkpoint-{step}"

    def publish(self, step: int, model, state: dict[str, Any]) -> tuple[pathlib.Path, float]:
        """Publishes checkpoint-<step> from a PEFT model; returns (its path, seconds taken).
        `state` (step, data cursor, ...) goes to trainer_state.json."""
        started = time.perf_counter()
        logged = "".join(_dumps(entry) + "\n" for entry in self.logged)

        def build(tmp: pathlib.Path) -> None:
            model.save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps(self.args, indent=2, sort_keys=True, default=str) + "\n")
            (tmp / "logging.jsonl").write_text(logged)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")

        path = checkpoint.publish(self.checkpoint_dir(step), build)
        return path, time.perf_counter() - started
