"""A full disk as the writers see it, and what libs.common makes of it: real writes (Python's,
torch's, safetensors') in a child process whose file-size limit (RLIMIT_FSIZE) they pass fail
with EFBIG and become DiskFull naming the path; a checkpoint publication that does not fit
publishes nothing, leaves no temporary directory and the previous checkpoint verifies; the
hidden leftovers of killed publications are cleared; the test-only fault points. Where the
test may mount a small tmpfs (root), a really full file system (ENOSPC) too."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest

from libs.common import checkpoint, disk, faults
from libs.common.errors import DiskFull, ResourceExhausted, status_code

ROOT = pathlib.Path(__file__).resolve().parents[3]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Bazel's packages too


def run_limited(code: str, limit: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs Python `code` in a child process that may not write a file past `limit` bytes.
    prlimit sets the limit, not a preexec_fn: Python code run between fork and exec in a process
    with gRPC threads (the test session's servers) can abort in gRPC's fork handlers."""
    return subprocess.run(["prlimit", f"--fsize={'unlimited' if limit == resource.RLIM_INFINITY else limit}", sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})})


def test_full_errno_finds_the_cause_of_every_writer_s_error():
    assert disk.full_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
    assert disk.full_errno(OSError(errno.EDQUOT, "Disk quota exceeded")) == errno.EDQUOT
    assert disk.full_errno(OSError(errno.EACCES, "Permission denied")) is None
    try:  # torch.save into a Python file: the OSError is the RuntimeError's context
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as exc:
        assert disk.full_errno(exc) == errno.EFBIG
    assert disk.full_errno(Exception("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == errno.ENOSPC
    assert disk.full_errno(Exception("I/O error: Permission denied (os error 13)")) is None
    assert disk.full_errno(ValueError("a bug")) is None


def test_writing_raises_disk_full_naming_the_path_and_lets_other_errors_pass(tmp_path):
    with pytest.raises(DiskFull) as caught:
        with disk.writing(tmp_path / "out", field="output_dir", context="nothing was written"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(caught.value) == (f"output_dir: no space to write {tmp_path / 'out'}: No space left on device (ENOSPC); "
                                 "nothing was written")
    assert isinstance(caught.value, ResourceExhausted)
    assert status_code(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.path == str(tmp_path / "out") and caught.value.errno == errno.ENOSPC
    with pytest.raises(PermissionError):
        with disk.writing(tmp_path / "out"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(DiskFull) as inner:  # the innermost write names its own file
        with disk.writing(tmp_path), disk.writing(tmp_path / "shard"):
            raise OSError(errno.EFBIG, "File too large")
    assert inner.value.path == str(tmp_path / "shard")


def test_real_writers_past_the_file_size_limit_become_disk_full(tmp_path):
    done = run_limited(f"""
        import torch
        from safetensors.torch import save_file
        from libs.common import disk
        from libs.common.errors import DiskFull

        tensors = {{"w": torch.zeros(100_000)}}  # 400 kB, past the 64 kB limit
        writers = {{
            "python": lambda path: open(path, "wb").write(bytes(100_000)),
            "torch.save": lambda path: torch.save(tensors, open(path, "wb")),
            "safetensors": lambda path: save_file(tensors, str(path)),
        }}
        for name, write in writers.items():
            try:
                with disk.writing("{tmp_path}/" + name):
                    write("{tmp_path}/" + name)
                print(name, "fit")
            except DiskFull as exc:
                print(name, exc)
        """, limit=64 << 10)
    assert done.returncode == 0, done.stderr  # SIGXFSZ is ignored by Python: the write fails, the process lives
    assert done.stdout.splitlines() == [f"{name} no space to write {tmp_path}/{name}: File too large (EFBIG)"
                                        for name in ("python", "torch.save", "safetensors")]


def test_a_publication_that_does_not_fit_publishes_nothing_and_keeps_the_previous(tmp_path):
    run = tmp_path / "run"
    done = run_limited(f"""
        import pathlib
        from libs.common import checkpoint
        from libs.common.errors import DiskFull

        def build(size):
            def fill(tmp):
                (tmp / "config.json").write_text("{{}}")
                (tmp / "weights.bin").write_bytes(bytes(size))
            return fill

        checkpoint.publish("{run}/checkpoint-1", build(32 << 10))
        try:
            checkpoint.publish("{run}/checkpoint-2", build(128 << 10), field="output_dir")
        except DiskFull as exc:
            print(exc)
        try:  # replacing a published checkpoint: the old one stays when the new one does not fit
            checkpoint.publish("{run}/checkpoint-1", build(128 << 10))
        except DiskFull as exc:
            print(exc)
        """, limit=64 << 10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"output_dir: no space to write {run}/checkpoint-2: File too large (EFBIG); nothing was published",
        f"no space to write {run}/checkpoint-1: File too large (EFBIG); nothing was published",
    ]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-1"]  # no temporary directory left
    assert checkpoint.checkpoints(run) == [run / "checkpoint-1"]
    assert sorted(checkpoint.verify(run / "checkpoint-1")["files"]) == ["config.json", "weights.bin"]
    assert (run / "checkpoint-1" / "weights.bin").stat().st_size == 32 << 10


def test_a_really_full_file_system_is_disk_full_too(tmp_path):
    """ENOSPC from a small tmpfs, where the test may mount one: in a private mount namespace
    (`unshare -m`, root only), so nothing outlives the child."""
    small = tmp_path / "small"
    small.mkdir()
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from libs.common import checkpoint, disk
        from libs.common.errors import DiskFull

        checkpoint.publish("{small}/run/checkpoint-1", lambda tmp: save_file({{"w": torch.zeros(100)}}, str(tmp / "w")))
        def weights(tmp):
            save_file({{"w": torch.zeros(100_000)}}, str(tmp / "model.safetensors"))  # 400 kB into 256 kB
        try:
            checkpoint.publish("{small}/run/checkpoint-2", weights, field="output_dir")
        except DiskFull as exc:
            print(exc)
        try:
            with disk.writing("{small}/state.pt"):
                torch.save({{"w": torch.zeros(100_000)}}, open("{small}/state.pt", "wb"))
        except DiskFull as exc:
            print(exc)
        """)
    script = 'mount -t tmpfs -o size=256k tmpfs "$1" || exit 99; exec "$2" -c "$3"'
    try:
        done = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(small), sys.executable, code],
                              capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": PYTHONPATH})
    except FileNotFoundError:
        pytest.skip("no unshare(1) to mount a small file system privately")
    if done.returncode != 0 and ("unshare" in done.stderr or done.returncode == 99):
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"output_dir: no space to write {small}/run/checkpoint-2: No space left on device (ENOSPC); nothing was published",
        f"no space to write {small}/state.pt: No space left on device (ENOSPC)",
    ]
    assert list(small.iterdir()) == []  # the tmpfs was the child's alone


def _publish(path: pathlib.Path, text: str) -> pathlib.Path:
    return checkpoint.publish(path, lambda tmp: (tmp / "weights.bin").write_text(text))


def test_remove_leftovers_clears_what_killed_publications_left(tmp_path):
    run = tmp_path / "run"
    _publish(run / "checkpoint-2", "two")
    _publish(run / "checkpoint-4", "four")
    half_built = run / ".tmp-checkpoint-6-0123abcd"  # killed while building: no manifest
    half_built.mkdir()
    (half_built / "weights.bin").write_text("si")
    half_removed = run / ".removed-checkpoint-1-89abcdef"  # killed while pruning
    half_removed.mkdir()
    replaced = run / ".old-checkpoint-4-0badc0de"  # a replaced version whose replacement arrived
    _publish(replaced, "four, before")
    os.rename(_publish(run / "checkpoint-8", "eight"), run / ".old-checkpoint-8-feedbeef")  # killed between renames
    others = [run / ".tmp-something-0123abcd", run / "notes"]  # not a publication's: left alone
    for other in others:
        other.mkdir()

    assert checkpoint.checkpoints(run) == [run / "checkpoint-2", run / "checkpoint-4"]
    found = checkpoint.remove_leftovers(run)
    assert found == sorted([half_built, half_removed, replaced, run / ".old-checkpoint-8-feedbeef"])
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint-2", "checkpoint-4", "checkpoint-8", ".tmp-something-0123abcd", "notes"])
    assert (run / "checkpoint-4" / "weights.bin").read_text() == "four"
    checkpoint.verify(run / "checkpoint-8")  # put back whole
    assert checkpoint.remove_leftovers(run) == []
    assert checkpoint.remove_leftovers(tmp_path / "missing") == []


def test_fault_specs_parse_or_fail_loudly():
    assert faults.parse("") == {}
    assert faults.parse("checkpoint.built#2=stop, serving.hold=kill") == {
        "checkpoint.built": (2, "stop"), "serving.hold": (1, "kill")}
    for bad in ("checkpoint.built", "checkpoint.built=pause", "x#0=kill", "x#two=kill", "=kill"):
        with pytest.raises(ValueError, match="TUNEFORGE_FAULT"):
            faults.parse(bad)
    assert faults.ARMED == {}  # this test process has no TUNEFORGE_FAULT: every point is inert


def test_an_armed_point_acts_on_its_hit_and_reports_the_process(tmp_path):
    report = tmp_path / "faults.jsonl"
    done = run_limited("""
        from libs.common import faults
        for i in range(1, 4):
            print("reached", i, flush=True)
            faults.reach("test.point")
        """, limit=resource.RLIM_INFINITY, env={faults.ENV: "test.point#2=kill", faults.REPORT_ENV: str(report)})
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split("\n")[:2] == ["reached 1", "reached 2"]
    (line,) = report.read_text().splitlines()
    assert json.loads(line)["point"] == "test.point" and json.loads(line)["action"] == "kill"


def test_production_call_sites_reach_faults_only_when_armed():
    """Every faults.reach outside libs/common/faults.py sits under `if faults.ARMED:`, so an
    unarmed process (no TUNEFORGE_FAULT at import) pays one attribute check per point."""
    import ast
    import pathlib

    root = pathlib.Path(faults.__file__).resolve().parents[2]
    sites, unguarded = [], []
    for path in sorted([*root.glob("libs/**/*.py"), *root.glob("services/**/*.py"), *root.glob("cli/**/*.py")]):
        if path.name == "faults.py" or "_pb2" in path.name:
            continue
        tree = ast.parse(path.read_text())
        guarded = {id(node) for test in ast.walk(tree) if isinstance(test, ast.If)
                   and ast.unparse(test.test) == "faults.ARMED" for node in ast.walk(ast.Module(test.body, []))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "faults.reach":
                sites.append(f"{path.relative_to(root)}:{node.lineno}")
                if id(node) not in guarded:
                    unguarded.append(sites[-1])
    assert len(sites) >= 4 and unguarded == [], (sites, unguarded)


def test_an_unarmed_process_never_calls_reach_while_publishing(tmp_path, monkeypatch):
    """Publication (the checkpoint.built point) with reach made to fail: it is never called."""
    assert faults.ARMED == {}

    def reach(point):
        raise AssertionError(f"faults.reach({point!r}) called in an unarmed process")

    monkeypatch.setattr(faults, "reach", reach)
    published = checkpoint.publish(tmp_path / "run" / "checkpoint-1", lambda tmp: (tmp / "w.bin").write_text("w"))
    assert (published / "w.bin").read_text() == "w"
    monkeypatch.setattr(faults, "ARMED", {"checkpoint.built": (1, "kill")})
    with pytest.raises(AssertionError, match="checkpoint.built"):  # armed, the same path does call it
        checkpoint.publish(tmp_path / "run" / "checkpoint-2", lambda tmp: (tmp / "w.bin").write_text("w"))
