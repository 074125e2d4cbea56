"""The serving process's hold on adapter files (services.serving.scratch), without an engine:
hard links that outlive the source; a hold that fails leaves nothing of itself (an unreadable
source, a full disk while copying across file systems under a file-size limit); a serving
process killed with SIGKILL halfway through a hold leaves its scratch behind, and the next
one to start removes it while the adapter itself stays whole. The engine's side (what vLLM
loads) runs in test_serving_admin.py and test_serving_disk_full.py."""

from __future__ import annotations

import os
import pathlib
import resource
import signal
import subprocess
import sys
import textwrap

import pytest

from libs.common import checkpoint, faults
from libs.common.errors import FailedPrecondition
from services.serving.scratch import PREFIX, Scratch

ROOT = pathlib.Path(__file__).resolve().parents[3]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Bazel's packages too
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "args.json", "manifest.json"]


def hold_in_child(root: pathlib.Path, source: pathlib.Path, limit: int = resource.RLIM_INFINITY,
                  env: dict | None = None) -> subprocess.CompletedProcess:
    """A process that holds `source` in a scratch under `root`, as serving does on a load."""
    code = f"""
        import pathlib
        from libs.common.errors import DiskFull
        from services.serving.scratch import Scratch
        scratch = Scratch("{root}")
        try:
            print(scratch.hold(pathlib.Path("{source}"), "1"))
        except DiskFull as exc:
            print(exc)
        """

    # prlimit, not a preexec_fn: Python code between fork and exec can abort in gRPC's fork handlers
    return subprocess.run(["prlimit", f"--fsize={'unlimited' if limit == resource.RLIM_INFINITY else limit}", sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


@pytest.fixture
def root(tmp_path) -> pathlib.Path:
    """The temporary directory serving processes make their scratch in."""
    (tmp_path / "tmp").mkdir()
    return tmp_path / "tmp"


@pytest.fixture
def adapter(tmp_path, publish_adapter) -> pathlib.Path:
    return publish_adapter(tmp_path / "run" / "checkpoint-1", tmp_path / "base", weights=bytes(200_000))


def test_a_hold_is_hard_links_that_outlive_the_source(root, adapter):
    scratch = Scratch(root)
    held = scratch.hold(adapter, "7")
    assert held == scratch.path / "adapters" / "7" and scratch.path.name.startswith(f"{PREFIX}{os.getpid()}-")
    assert sorted(p.name for p in held.iterdir()) == ADAPTER_FILES
    assert (held / "adapter_model.safetensors").stat().st_ino == (adapter / "adapter_model.safetensors").stat().st_ino
    checkpoint.discard(adapter)  # the trainer prunes it
    checkpoint.verify(held)
    scratch.release(held)
    assert not held.exists()
    scratch.close()
    assert not scratch.path.exists()


def test_an_unreadable_source_fails_the_hold_and_leaves_nothing(root, tmp_path):
    scratch = Scratch(root)
    with pytest.raises(FailedPrecondition) as refused:
        scratch.hold(tmp_path / "gone", "1")
    assert refused.value.field == "path" and refused.value.message.startswith(f"cannot read {tmp_path / 'gone'}: ")
    assert list((scratch.path / "adapters").iterdir()) == []


def test_a_full_disk_while_copying_fails_the_hold_and_leaves_nothing(root, tmp_path, publish_adapter):
    # Hard links take no room: a hold writes data only when it copies, across file systems.
    other = pathlib.Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"needs a file system other than {tmp_path}'s to copy from (/dev/shm)")
    source = publish_adapter(other / f"tuneforge-test-{os.getpid()}" / "checkpoint-1", tmp_path / "base",
                             weights=bytes(200_000))
    try:
        done = hold_in_child(root, source, limit=64 << 10)
    finally:
        checkpoint.discard(source)
        source.parent.rmdir()
    (scratch,) = root.iterdir()
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"no space to write {scratch}/adapters/1: File too large (EFBIG); holding the engine's "
                           f"copy of {source}; free space in {root}\n")
    assert list((scratch / "adapters").iterdir()) == []  # no half-copied adapter


def test_a_server_killed_during_a_hold_leaves_its_scratch_to_the_next_start(root, adapter):
    done = hold_in_child(root, adapter, env={faults.ENV: "serving.hold#2=kill"})  # after 2 of the 4 files
    assert done.returncode == -signal.SIGKILL, done.stderr
    (stale,) = root.iterdir()
    assert len(list((stale / "adapters" / "1").iterdir())) == 2  # half held

    restarted = Scratch(root)
    assert restarted.removed_stale == [str(stale)]
    assert sorted(root.iterdir()) == [restarted.path]
    checkpoint.verify(adapter)  # the adapter itself is whole: a new load takes all of it
    assert sorted(p.name for p in restarted.hold(adapter, "1").iterdir()) == ADAPTER_FILES
