"""Launching a distributed job under torchrun, as ms-swift does.

How it fits the job model: a job is still one child process of the trainer service
(services.trainer.worker). When the job asks for more than one process (`nproc_per_node`
x `nnodes` > 1) and the worker is not itself a torchrun rank, the worker becomes the
launcher: it runs `python -m torch.distributed.run ... -m services.trainer.worker` and
relays the ranks' events to the service. The local rank 0 of each node reports progress;
global rank 0 alone writes the run directory and publishes checkpoints; a failing rank
reports its error, and torchrun stops the others. `tuneforge sft` reads NPROC_PER_NODE,
NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT into these fields, so
`NPROC_PER_NODE=2 tuneforge sft ...` trains on two processes through the same gRPC job.

The trainer also runs under a plain `torchrun -m services.trainer.worker --config C.json`:
it then reads RANK / WORLD_SIZE / LOCAL_RANK itself (events of local rank 0 on stdout).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from libs.common import logs, tempdirs

# ms-swift's environment variables and the TrainConfig fields they fill
ENVIRONMENT = {"NPROC_PER_NODE": "nproc_per_node", "NNODES": "nnodes", "NODE_RANK": "node_rank",
               "MASTER_ADDR": "master_addr", "MASTER_PORT": "master_port"}
# events a rank that does not report progress still sends (its failure)
ALWAYS_SENT = ("error",)
_PR_SET_PDEATHSIG = 1
LOG = logging.getLogger("tuneforge.trainer.launch")


def from_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launch fields set through ms-swift's environment variables (as flag strings)."""
    environ = os.environ if environ is None else environ
    return {field: environ[name] for name, field in ENVIRONMENT.items() if environ.get(name, "").strip()}


def world_size(config) -> int:
    return config.nproc_per_node * config.nnodes


def needs_launch(config, environ: dict[str, str] | None = None) -> bool:
    """More than one process wanted and this process is not already a torchrun rank."""
    environ = os.environ if environ is None else environ
    return world_size(config) > 1 and "RANK" not in environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(config, worker_args: list[str], python: str = sys.executable) -> list[str]:
    port = config.master_port or free_port()
    return [python, "-m", "torch.distributed.run", f"--nproc_per_node={config.nproc_per_node}",
            f"--nnodes={config.nnodes}", f"--node_rank={config.node_rank}", f"--master_addr={config.master_addr}",
            f"--master_port={port}", "--max_restarts=0", "-m", "services.trainer.worker", *worker_args]


def rank_environment(config, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ranks of this node share the CPU threads the service gave this job."""
    environ = dict(os.environ if environ is None else environ)
    threads = int(environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    environ["OMP_NUM_THREADS"] = str(max(1, threads // config.nproc_per_node))
    return environ


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (torchrun starts ranks in
    their own sessions, so a killed launcher would otherwise leave them training)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


# Test hook for failure handling: "RANK:STEP" makes that rank raise after that step.
FAULT_ENV = "TUNEFORGE_FAULT_RANK_STEP"


def injected_fault(rank: int, step: int, environ: dict[str, str] | None = None) -> None:
    spec = (os.environ if environ is None else environ).get(FAULT_ENV)
    if spec and spec == f"{rank}:{step}":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec})")


class Relay:
    """Follows the ranks' shared events file and forwards its lines to `send`: every
    event of the reporting rank, and the first error of any rank (named by rank)."""

    def __init__(self, path: str, send: Callable[..., None]):
        self.path = path
        self.send = send
        self.error: dict[str, Any] | None = None
        self.done = threading.Event()  # the reporting rank said "done": the run is published
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="events-relay", daemon=True)

    def _forward(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind = event.pop("event", None)
        if kind == "error":
            if self.error is not None:  # the others fail because the first one did
                return
            self.error = event
            rank = event.pop("rank", None)
            if rank is not None:
                event["message"] = f"rank {rank} failed: {event.get('message', '')} (torchrun stopped the other ranks)"
        else:
            event.pop("rank", None)
        self.send(kind, **event)
        if kind == "done":
            self.done.set()

    def _run(self) -> None:
        with open(self.path) as f:
            pending = ""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        self._forward(pending)
                        pending = ""
                    continue
                if self.finished.is_set():
                    return
                time.sleep(0.05)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.finished.set()
        self.thread.join()


LAUNCH_DIR_PREFIX = "tuneforge-launch-"
# How long ranks may take to exit once the run is done (published, every rank past its last
# collective) before the launcher kills them; overridable by environment for tests.
EXIT_GRACE_ENV = "TUNEFORGE_RANK_EXIT_GRACE_SECONDS"
EXIT_GRACE_SECONDS = 60.0


def wait_for_ranks(process: subprocess.Popen, relay: Relay, grace: float | None = None) -> int:
    """torchrun's exit code; once the ranks have reported done, ranks still running after
    `grace` seconds are killed (with torchrun: they die with it) and the job counts as done.
    A rank's interpreter teardown was seen to deadlock after the work was complete (DDP's gloo
    process group joining its worker thread while that thread waited for the GIL): the
    published run must not turn into a hung job for it."""
    if grace is None:
        grace = float(os.environ.get(EXIT_GRACE_ENV, EXIT_GRACE_SECONDS))
    while not relay.done.is_set():
        try:
            return process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
    try:
        return process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        logs.log(LOG, logging.WARNING, "ranks still running after done were killed", grace_seconds=grace)
        process.kill()
        process.wait()
        return 0


def remove_stale_launch_dirs(root: str | None = None) -> list[str]:
    """Removes the events directories of launchers that no longer run. A launcher killed with
    SIGKILL cannot remove its own; each is named after its launcher's pid
    (`tuneforge-launch-<pid>-*`), so the next launch removes those whose process is gone."""
    return tempdirs.remove_stale(LAUNCH_DIR_PREFIX, root)


def run(config, config_path: str, send: Callable[..., None], stop: threading.Event) -> int:
    """Runs the job under torchrun from this (launcher) process; returns the exit code
    for the worker: 0 done, 2 a rank reported an error, else torchrun's code."""
    remove_stale_launch_dirs()
    tmp = tempdirs.make(LAUNCH_DIR_PREFIX)
    try:
        events_path = os.path.join(tmp, "events.jsonl")
        open(events_path, "w").close()
        command = torchrun_command(config, ["--config", config_path, "--events_path", events_path])
        relay = Relay(events_path, send)
        relay.start()
        # torchrun's and the ranks' output goes to stderr: stdout may be the events stream
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(),
                                   env=rank_environment(config), preexec_fn=die_with_parent)

        def forward_stop() -> None:
            stop.wait()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # torchrun passes it to every rank

        threading.Thread(target=forward_stop, daemon=True).start()
        code = wait_for_ranks(process, relay)
        relay.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if relay.error is not None:
        return 2
    return code
