"""The training child process: `python -m services.trainer.worker --config CONFIG.json
[--events_fd FD]` runs the SFT recipe and reports its events as JSON lines on a pipe.

Running the recipe in its own process keeps the service responsive, lets a job be
cancelled with a signal and killed if it hangs. Started with `--parent_pid` (by the trainer
service) it dies with that process: a service killed with SIGKILL leaves no job training
unwatched, which a resumed job in the same directory would race. A job of more than one
process makes this process the launcher of torchrun, whose ranks run this module again with
`--events_path` (services.trainer.launch). SIGTERM (or SIGINT) stops training at the next step
boundary; the recipe then publishes a checkpoint and the process exits 0.

Events (one JSON object a line, key "event"): started, progress (every step), step
(every logged step), checkpoint, checkpoint_failed (a publication raised; error follows), done,
and error (a user-facing problem; exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any, TextIO

from libs.common import config as cfg
from libs.common import faults
from libs.common import logs
from libs.common.errors import TuneForgeError
from services.trainer import distributed, launch
from services.trainer.config import TrainConfig

ERROR_EXIT = 2


class EventWriter:
    """Writes one JSON line per event and flushes it, so the parent sees it at once."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class RankEvents:
    """A torchrun rank's events: the reporting rank (local rank 0) sends all of them, the
    others only their errors; each names its rank."""

    def __init__(self, write: EventWriter, world: distributed.World):
        self.write = write
        self.world = world

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "progress":
            launch.injected_fault(self.world.rank, fields["step"])
        if self.world.reports or event in launch.ALWAYS_SENT:
            self.write(event, rank=self.world.rank, **fields)


def install_stop_handlers() -> threading.Event:
    stop = threading.Event()

    def handle(_signum, _frame) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)
    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON")
    parser.add_argument("--events_fd", type=int, default=1, help="file descriptor for the JSON event lines")
    parser.add_argument("--events_path", default=None,
                        help="torchrun ranks started by the launcher: file the ranks append their event lines to")
    parser.add_argument("--parent_pid", type=int, default=None,
                        help="the trainer service that started this process: die (SIGKILL) when it dies")
    options = parser.parse_args(argv)
    if options.parent_pid is not None:
        launch.die_with_parent()
        if os.getppid() != options.parent_pid:  # it died before we asked to follow it
            return ERROR_EXIT
    stop = install_stop_handlers()
    logs.setup("trainer-worker")
    world = distributed.world_from_env()
    if options.events_path:  # appended to by every rank: one write per line
        events: Any = EventWriter(open(options.events_path, "a", buffering=1))
    else:  # The events pipe is ours alone: nothing else may write to it.
        events = EventWriter(os.fdopen(options.events_fd, "w", buffering=1, closefd=options.events_fd > 2))
    if world.distributed:
        events = RankEvents(events, world)
        launch.die_with_parent()
    try:
        with open(options.config) as f:
            config = cfg.from_dict(TrainConfig, json.load(f), where=options.config)
        if launch.needs_launch(config):
            return launch.run(config, options.config, events, stop)
        from services.trainer import training  # torch and transformers load after the arguments are known good

        training.train(config, events, stop)
    except TuneForgeError as exc:
        events("error", message=str(exc), code=exc.code.name, field=exc.field)
        return ERROR_EXIT
    except Exception as exc:
        if not world.distributed:
            raise
        # named by rank so the job says which rank failed first; the traceback follows on stderr
        events("error", message=f"{type(exc).__name__}: {exc}", code="INTERNAL", field=None)
        raise
    return 0


def exit_rank(code: int) -> None:
    """Ends a torchrun rank without the interpreter's teardown: the run is over and its files
    are closed, and destroying torch's distributed objects at exit was seen to deadlock (gloo's
    worker thread waiting for the GIL the tearing-down main thread held)."""
    if faults.ARMED:
        faults.reach("worker.exit")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if distributed.world_from_env().distributed:
        exit_rank(code)
    sys.exit(code)
