"""Where a model lives: a given Hugging Face directory, or the cached default model, built once per fingerprint.

The cache is `$TUNEFORGE_HOME/models/default-<fingerprint>` (TUNEFORGE_HOME defaults to
~/.cache/tuneforge). The fingerprint hashes what decides the model's bytes: the builder's
source, the corpus, the build settings and the library versions, so a change to any of them
builds a fresh directory beside the old one instead of reusing a stale model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
from dataclasses import asdict

from libs.common import paths
from libs.common.errors import NotFound
from libs.common.logs import log
from libs.default_model import corpus
from libs.default_model.config import BuildConfig, library_versions

logger = logging.getLogger("tuneforge.default_model")

PACKAGE_DIR = pathlib.Path(__file__).parent
# Modules that only find, check or expose the model; every other file of the package may
# change the built bytes, so it is fingerprinted (a new module is covered without a list to update).
NOT_BUILD_INPUTS = {"__init__.py", "cli.py", "parity.py", "resolve.py"}


def tuneforge_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TUNEFORGE_HOME") or pathlib.Path.home() / ".cache" / "tuneforge").expanduser()


def fingerprint(config: BuildConfig = BuildConfig()) -> str:
    """A short hash of everything that decides the default model's bytes."""
    digest = hashlib.sha256()
    sources = sorted(p for p in PACKAGE_DIR.iterdir() if p.is_file() and p.suffix in (".py", ".jinja") and p.name not in NOT_BUILD_INPUTS)
    for path in sources + corpus.corpus_files():
        digest.update(str(path.relative_to(PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps({"config": asdict(config), "versions": library_versions()}, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def default_model_dir(config: BuildConfig = BuildConfig()) -> pathlib.Path:
    """The cached default model, built there first if missing. Concurrent callers (services,
    parallel tests) serialise on a file lock; the build is published by an atomic rename, so a
    directory that exists is always complete."""
    models = tuneforge_home() / "models"
    name = f"default-{fingerprint(config)}"
    final = models / name
    if (final / "config.json").is_file():
        return final
    models.mkdir(parents=True, exist_ok=True)
    # The lock file stays: removing it would let a late waiter lock a file nobody else sees.
    with open(models / f"{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(logger, logging.INFO, "waiting for another process building the default model", path=str(final))
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "config.json").is_file():
            return final
        # Left by a build that was killed; we hold the lock, so nobody is writing them.
        for stale in models.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        log(logger, logging.INFO, "building the default model (once, about a minute)", path=str(final))
        from libs.default_model.build import build  # torch and transformers load only when building

        build(final, config)
    return final


def resolve_model(model: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """`model` as an absolute Hugging Face model directory, or the cached default model when
    it is None or empty (an unset proto string field)."""
    if model is None or str(model) == "":
        return default_model_dir()
    path = paths.expand_user(paths.argument(str(model), "model"), "model")
    if not path.is_dir():
        raise NotFound(f"model directory {path} does not exist", field="model")
    if not (path / "config.json").is_file():
        raise NotFound(f"{path} is not a Hugging Face model directory (it has no config.json)", field="model")
    return path.resolve()
