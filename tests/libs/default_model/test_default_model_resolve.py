"""resolve_model: given directories are checked; the default is cached per fingerprint and built once under a lock."""

import dataclasses
import fcntl
import os
import pathlib
import subprocess
import sys
import time

import pytest

from libs.common.errors import NotFound
from libs.default_model.config import BuildConfig
from libs.default_model.resolve import default_model_dir, fingerprint, resolve_model

REPO = pathlib.Path(__file__).resolve().parents[3]
TINY = dataclasses.replace(BuildConfig(), max_steps=2)
RESOLVE_TINY = (
    "import dataclasses, logging\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "from libs.default_model.config import BuildConfig\n"
    "from libs.default_model.resolve import default_model_dir\n"
    "print(default_model_dir(dataclasses.replace(BuildConfig(), max_steps=2)))\n"
)


def test_missing_path_is_not_found_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(NotFound) as caught:
        resolve_model(str(missing))
    assert caught.value.field == "model"
    assert str(missing) in str(caught.value)


def test_directory_without_config_is_not_found(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(NotFound, match="no config.json") as caught:
        resolve_model(tmp_path)
    assert caught.value.field == "model" and str(tmp_path) in str(caught.value)


def test_given_model_directory_is_returned_absolute(default_model, monkeypatch):
    monkeypatch.chdir(default_model.parent)
    assert resolve_model(default_model.name) == default_model.resolve()


def test_none_and_empty_mean_the_cached_default(default_model):
    assert resolve_model(None) == resolve_model("") == default_model
    assert default_model.name == f"default-{fingerprint()}"
    assert (default_model / "config.json").is_file()


def test_fingerprint_follows_the_build_settings():
    assert fingerprint() == fingerprint(BuildConfig())
    assert fingerprint(TINY) != fingerprint()
    assert len(fingerprint()) == 12


@pytest.mark.slow
def test_concurrent_callers_wait_for_one_build(tmp_path):
    env = dict(os.environ, TUNEFORGE_HOME=str(tmp_path))
    models = tmp_path / "models"
    name = f"default-{fingerprint(TINY)}"
    # What a killed build leaves behind: cleaned up by the next builder.
    stale = models / f".tmp-{name}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    logs = [tmp_path / f"caller-{i}.log" for i in range(2)]
    with open(models / f"{name}.lock", "a") as lock:
        # Hold the lock as a builder would, so both callers must queue behind it.
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen([sys.executable, "-c", RESOLVE_TINY], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
            for log in logs
        ]
        deadline = time.monotonic() + 240
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs), [log.read_text()[-2000:] for log in logs]
            time.sleep(0.2)
        assert not (models / name).exists()
    outputs = [proc.communicate(timeout=240)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
    assert outputs == [str(models / name)] * 2
    assert sum("pre-training the default model" in log.read_text() for log in logs) == 1
    assert sorted(p.name for p in models.iterdir()) == [name, f"{name}.lock"]
    assert (models / name / "model.safetensors").is_file()


def test_cached_default_is_reused_without_building(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    first = default_model_dir(TINY)
    assert "pre-training the default model" in capfd.readouterr().err
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir(TINY) == first
    assert "pre-training" not in capfd.readouterr().err
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
