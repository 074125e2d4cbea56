"""A disk that fills while dataprep writes shards, simulated with a file-size limit
(RLIMIT_FSIZE) on the process that writes them: the first shard fits, the second does not.
The preparation fails with one error naming the shard (RESOURCE_EXHAUSTED over gRPC, one
line and exit 2 from the CLI), leaves no manifest, no shard and no temporary file; the
service stays up and prepares the same data once there is room."""

from __future__ import annotations

import os
import pathlib
import resource
import subprocess
import sys

import pytest

from cli.main import main as tuneforge
from cli.stack import Stack, wait_serving
from libs.common.errors import ResourceExhausted
from libs.dataset import client
from services.dataprep.config import PrepareConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]
PYTHONPATH = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # Bazel's packages too
LIMIT = 16 << 10  # shard-00000 (8 short rows) is ~4 kB, shard-00001 (8 long rows) ~50 kB


@pytest.fixture
def dataset(write_jsonl, conversation) -> pathlib.Path:
    long = [{"messages": [{"role": "user", "content": "Tell me a long story. " * 5},
                          {"role": "assistant", "content": f"Once upon a time there was a number {i}. " * 60}]}
            for i in range(8)]
    return write_jsonl("train.jsonl", [conversation(i) for i in range(8)] + long)


def test_the_cli_fails_with_one_line_and_leaves_nothing(dataset, tmp_path):
    out = tmp_path / "out"
    # prlimit, not a preexec_fn: Python code between fork and exec can abort in gRPC's fork handlers
    done = subprocess.run(["prlimit", f"--fsize={LIMIT}", sys.executable, "-m", "cli.main", "prepare", "--dataset",
                           str(dataset), "--output_dir", str(out), "--shard_rows", "8"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("prepare: ")]  # no bar
    assert errors == [f"tuneforge prepare: error: output_dir: no space to write {out}/shard-00001.arrow: "
                      "File too large (EFBIG)"], done.stderr
    assert done.returncode == 2 and done.stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]  # no manifest, shard, listing or .tmp


@pytest.mark.slow
def test_the_service_fails_the_preparation_with_resource_exhausted_and_recovers(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    config = PrepareConfig(dataset=[str(dataset)], output_dir=str(out), shard_rows=8)
    with Stack(tmp_path / "logs") as stack:
        dataprep = stack.start_dataprep()
        hard = resource.prlimit(dataprep.popen.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(dataprep.popen.pid, resource.RLIMIT_FSIZE, (LIMIT, hard))

        with pytest.raises(ResourceExhausted) as failed:  # the client's type for RESOURCE_EXHAUSTED
            client.prepare(dataprep.grpc_address, config)
        assert str(failed.value) == f"output_dir: no space to write {out}/shard-00001.arrow: File too large (EFBIG)"
        assert sorted(p.name for p in out.iterdir()) == ["rejects.jsonl"]

        code = tuneforge(["prepare", "--dataset", str(dataset), "--output_dir", str(out), "--shard_rows", "8",
                          "--dataprep_address", dataprep.grpc_address])
        errors = [line for line in capsys.readouterr().err.splitlines()
                  if line.strip() and not line.startswith("prepare: ")]
        assert code == 2 and errors == [
            f"tuneforge prepare: error: output_dir: no space to write {out}/shard-00001.arrow: File too large (EFBIG)"]

        wait_serving(dataprep.grpc_address, timeout=5)
        resource.prlimit(dataprep.popen.pid, resource.RLIMIT_FSIZE, (hard, hard))  # room again
        manifest = client.prepare(dataprep.grpc_address, config)
        assert [s["file"] for s in manifest["shards"]] == ["shard-00000.arrow", "shard-00001.arrow"]
        assert sorted(p.name for p in out.iterdir()) == [
            "manifest.json", "rejects.jsonl", "shard-00000.arrow", "shard-00001.arrow"]
        assert stack.stop() == {"dataprep": 0}
