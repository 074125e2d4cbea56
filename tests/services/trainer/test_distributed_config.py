"""Distributed settings checked before any work starts: an unknown --deepspeed name, a
missing or broken DeepSpeed JSON, fsdp with deepspeed, bad node ranks all come back from
the real trainer service as one INVALID_ARGUMENT naming each field; ms-swift's launch
environment variables become the job's fields; the torchrun command a job runs."""

import os

import pytest

from libs.common.errors import InvalidArgument
from cli import train as cli
from services.trainer import client, distributed, launch
from services.trainer.config import TrainConfig


def test_bad_distributed_settings_are_invalid_argument_before_any_work(trainer, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2},\n "bf16": {enabled: true}}')
    with_optimizer = tmp_path / "opt.json"
    with_optimizer.write_text('{"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}')
    cases = {
        "deepspeed: expected zero2, zero3 or a .json file; got 'zero4'": dict(deepspeed="zero4"),
        f"deepspeed: {tmp_path}/missing.json: no such file": dict(deepspeed=str(tmp_path / "missing.json")),
        f"deepspeed: {broken}:2: not valid JSON": dict(deepspeed=str(broken)),
        f"deepspeed: {with_optimizer}: optimizer: TuneForge sets the optimizer": dict(deepspeed=str(with_optimizer)),
        "fsdp: cannot be combined with deepspeed": dict(deepspeed="zero2", fsdp=True),
        "node_rank: expected 0 <= node_rank < nnodes (2); got 2": dict(nnodes=2, node_rank=2, master_port=29500),
        "master_port: required with nnodes > 1": dict(nnodes=2),
        "nproc_per_node: must be at least 1; got 0": dict(nproc_per_node=0),
    }
    for expected, fields in cases.items():
        config = TrainConfig(dataset="d", dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "run"), **fields)
        with pytest.raises(InvalidArgument) as caught:
            client.submit(trainer.address, config)
        assert expected in str(caught.value), (expected, str(caught.value))
    assert not (tmp_path / "run").exists()  # no work started

    # all at once
    config = TrainConfig(dataset="d", dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "run"),
                       deepspeed="zero9", fsdp=True, nproc_per_node=0)
    with pytest.raises(InvalidArgument) as caught:
        client.submit(trainer.address, config)
    for field in ("deepspeed:", "fsdp:", "nproc_per_node:"):
        assert field in str(caught.value)


def test_launch_environment_becomes_flags_the_command_line_overrides(monkeypatch, tmp_path):
    for name in ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert cli.with_launch_environment(["--max_steps", "3"]) == ["--max_steps", "3"]
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    raw = tmp_path / "x.jsonl"
    raw.write_text("")
    argv = cli.with_launch_environment(["--nproc_per_node", "4"])
    command = cli.cfg.parse(cli.SftCommandConfig, argv + ["--dataset", str(raw), "--output_dir", str(tmp_path / "o")])
    assert (command.nproc_per_node, command.nnodes, command.node_rank, command.master_addr,
            command.master_port) == (4, 2, 1, "10.0.0.1", 29501)


def test_torchrun_command_and_when_a_job_needs_it():
    config = TrainConfig(nproc_per_node=2, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501)
    command = launch.torchrun_command(config, ["--config", "c.json"], python="py")
    assert command == ["py", "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2", "--node_rank=1",
                       "--master_addr=10.0.0.1", "--master_port=29501", "--max_restarts=0",
                       "-m", "services.trainer.worker", "--config", "c.json"]
    assert launch.needs_launch(config, environ={})
    assert not launch.needs_launch(config, environ={"RANK": "0"})  # already a rank
    assert not launch.needs_launch(TrainConfig(), environ={})  # one process
    assert launch.rank_environment(config, {"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "2"
    assert distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.World(3, 4, 1)


def test_deepspeed_presets_fill_auto_from_the_job():
    config = TrainConfig(deepspeed="zero3", per_device_train_batch_size=2, gradient_accumulation_steps=3,
                       max_grad_norm=0.5, torch_dtype="bfloat16")
    resolved = distributed.resolved_deepspeed_config(config, distributed.World(0, 4, 0))
    assert resolved["zero_optimization"]["stage"] == 3
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"],
            resolved["train_batch_size"], resolved["gradient_clipping"]) == (2, 3, 24, 0.5)
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False


def test_a_killed_launchers_events_directory_is_removed_by_the_next_launch(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"{launch.LAUNCH_DIR_PREFIX}{int(gone.stdout)}-abc"  # its launcher got SIGKILL
    alive = tmp_path / f"{launch.LAUNCH_DIR_PREFIX}{os.getpid()}-def"  # a launch still running
    other = tmp_path / f"{launch.LAUNCH_DIR_PREFIX}xyz"  # not named after a pid: not ours to judge
    for directory in (dead, alive, other):
        directory.mkdir()
        (directory / "events.jsonl").write_text("{}\n")
    assert launch.remove_stale_launch_dirs(str(tmp_path)) == [str(dead)]
    assert not dead.exists() and alive.exists() and other.exists()
