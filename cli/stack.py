"""Starts the three services as separate processes on loopback and stops them
cleanly: used by `tuneforge demo` and by the integration tests.

Each service binds port 0 and reports its ports in a ready file; we wait for
that file, then for SERVING from the real gRPC health service.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.common import channels
from libs.common.errors import Unavailable


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: pathlib.Path
    ready: dict = field(default_factory=dict)

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ready['grpc_port']}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def wait_serving(address: str, timeout: float = 30.0, service: str = "") -> None:
    """Blocks until the gRPC health service at `address` says SERVING."""
    deadline = time.monotonic() + timeout
    with channels.open_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"{address} did not report SERVING within {timeout:.0f} s")
            time.sleep(0.2)


class Stack:
    """dataprep, trainer and serving, each its own process, logs under `log_dir`."""

    def __init__(self, log_dir: str | pathlib.Path, env: dict | None = None):
        self.log_dir = pathlib.Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.processes: dict[str, Process] = {}

    def start(self, name: str, args: list[str], timeout: float = 60.0) -> Process:
        ready_file = self.log_dir / f"{name}.ready.json"
        ready_file.unlink(missing_ok=True)
        log_path = self.log_dir / f"{name}.log"
        command = [sys.executable, "-m", "cli.main", "serve", name,
                   "--port", "0", "--ready_file", str(ready_file), *args]
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        process = Process(name, popen, log_path)
        self.processes[name] = process
        deadline = time.monotonic() + timeout
        while not ready_file.exists():
            if popen.poll() is not None:
                raise Unavailable(f"{name} exited with code {popen.returncode} while starting; "
                                  f"last lines of {log_path}:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} was not ready within {timeout:.0f} s; see {log_path}")
            time.sleep(0.2)
        process.ready = json.loads(ready_file.read_text())
        wait_serving(process.grpc_address, timeout=max(5.0, deadline - time.monotonic()))
        return process

    def start_dataprep(self) -> Process:
        return self.start("dataprep", ["--metrics_port", "0"])

    def start_trainer(self) -> Process:
        return self.start("trainer", ["--metrics_port", "0"])

    def start_serving(self, model: str | None = None, trainer_address: str | None = None,
                      extra: list[str] | None = None, timeout: float = 300.0) -> Process:
        args = ["--grpc_port", "0"]
        if model:
            args += ["--model", model]
        if trainer_address:
            args += ["--trainer_address", trainer_address]
        return self.start("serving", args + list(extra or []), timeout=timeout)

    def stop(self, grace: float = 30.0) -> dict[str, int]:
        """SIGTERM every process (newest first), wait for them to drain, SIGKILL stragglers.
        Returns each process's exit code."""
        codes: dict[str, int] = {}
        for name, process in reversed(list(self.processes.items())):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, process in reversed(list(self.processes.items())):
            try:
                codes[name] = process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.popen.pid, signal.SIGKILL)
                codes[name] = process.popen.wait()
        self.processes.clear()
        return codes

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
