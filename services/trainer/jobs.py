"""Training jobs as long-running operations: a queue (at most `max_concurrent_jobs` run,
the rest wait PENDING in submission order), one child process per running job
(services.trainer.worker) whose JSON event lines become the job's state and history,
replay and fan-out of that history to watchers, cancellation by signal, and the
server-wide feed of checkpoint publications."""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from libs.common import config as cfg
from libs.common import logs, tempdirs
from libs.common.errors import FailedPrecondition, NotFound, Unavailable
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import metrics
from services.trainer.config import TrainConfig, as_dict

LOG = logging.getLogger("tuneforge.trainer.jobs")

TERMINAL = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
STATES = [s for s in pb.JobState.values() if s != pb.JOB_STATE_UNSPECIFIED]
TAIL_LINES = 20
WORK_DIR_PREFIX = "tuneforge-trainer-"
# The child must run the very code this server runs, installed or not.
_CODE_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _message_fields(message_cls, event: dict) -> dict:
    """The event's values for the message's fields (its `metrics` map included)."""
    return {k: event[k] for k in message_cls.DESCRIPTOR.fields_by_name if k in event}


def state_name(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


@dataclass
class Job:
    id: str
    config: TrainConfig
    arguments: dict[str, Any]
    state: int = pb.JOB_STATE_PENDING
    step: int = 0
    total_steps: int = 0
    last_checkpoint: str = ""
    error: str = ""
    error_code: int = 0  # google.rpc.Code of `error`, as the training process reported it
    # every WatchJobResponse so far, replayed to each new watcher
    events: list[pb.WatchJobResponse] = field(default_factory=list)
    cancel_requested: bool = False
    process: subprocess.Popen | None = None
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    eval_losses: dict[int, float] = field(default_factory=dict)  # step -> eval loss, for its checkpoint's event
    finished_at: float | None = None  # time.monotonic() when it reached a terminal state
    done: dict | None = None  # the child's "done" event
    failure: dict | None = None  # the child's "error" event
    series: metrics.JobSeries = field(init=False)  # its per-job metrics, removed when it ends

    def __post_init__(self) -> None:
        self.series = metrics.JobSeries(self.id)

    def proto(self) -> pb.Job:
        return pb.Job(id=self.id, state=self.state, arguments_json=json.dumps(self.arguments, sort_keys=True, default=str),
                      step=self.step, total_steps=self.total_steps, last_checkpoint=self.last_checkpoint, error=self.error,
                      error_code=self.error_code)


class JobManager:
    """Owns every job of one trainer server. Thread-safe; watchers block on one condition."""

    def __init__(self, max_concurrent_jobs: int = 1, cancel_timeout: float = 60.0, torch_threads: int = 0,
                 python: str = sys.executable, keep_finished_jobs: int = 256,
                 finished_job_retention: float = 7 * 24 * 3600.0, clock: Callable[[], float] = time.monotonic):
        self.max_concurrent_jobs = max_concurrent_jobs
        # Finished jobs (their events, output tail and checkpoint publications) are forgotten
        # beyond this many or after this many seconds; their run directories stay on disk.
        self.keep_finished_jobs = keep_finished_jobs
        self.finished_job_retention = finished_job_retention
        self._clock = clock
        self.cancel_timeout = cancel_timeout
        # Concurrent jobs split the cores instead of each taking all: oversubscribed cores make
        # torch's OpenMP threads crawl.
        self.torch_threads = torch_threads or max(1, (os.cpu_count() or 1) // max_concurrent_jobs)
        self.python = python
        self._cond = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._checkpoints: list[pb.CheckpointEvent] = []
        self._checkpoints_dropped = 0  # publications of forgotten jobs cut from the front of the feed
        self._runners: list[threading.Thread] = []
        self._closing = False  # no new jobs
        self._closed = False  # streams end
        # jobs' config files; a server killed with SIGKILL leaves its own, the next one removes it
        tempdirs.remove_stale(WORK_DIR_PREFIX)
        self._work_dir = pathlib.Path(tempdirs.make(WORK_DIR_PREFIX))
        self._update_job_metrics()

    # --- API used by the servicer

    def submit(self, config: TrainConfig) -> pb.Job:
        """Queues a validated job; it starts as soon as a slot is free."""
        output_dir = pathlib.Path(config.output_dir).resolve()
        with self._cond:
            if self._closing:
                raise Unavailable("the trainer is shutting down")
            for other in self._jobs.values():
                if other.state not in TERMINAL and pathlib.Path(other.config.output_dir).resolve() == output_dir:
                    raise FailedPrecondition(f"job {other.id} is already writing to {output_dir}", field="output_dir")
            self._forget_finished()
            job = Job(id=uuid.uuid4().hex[:16], config=config, arguments=as_dict(config))
            self._jobs[job.id] = job
            self._record_state(job)
            self._schedule()
            return job.proto()

    def get(self, job_id: str) -> pb.Job:
        with self._cond:
            self._forget_finished()
            return self._job(job_id).proto()

    def list_jobs(self) -> list[pb.Job]:
        with self._cond:
            self._forget_finished()
            return [job.proto() for job in self._jobs.values()]

    def process_id(self, job_id: str) -> int | None:
        """The pid of the job's training process while it runs."""
        with self._cond:
            process = self._job(job_id).process
            return process.pid if process is not None and process.poll() is None else None

    def cancel(self, job_id: str) -> pb.Job:
        """Stops a job: a PENDING one never starts; a RUNNING one gets SIGTERM, publishes a
        checkpoint at its current step and ends CANCELLED. Idempotent."""
        with self._cond:
            job = self._job(job_id)
            if job.state in TERMINAL:
                return job.proto()
            self._cancel_locked(job)
            return job.proto()

    def _cancel_locked(self, job) -> None:
        """A pending job ends CANCELLED at once; a running one is asked to stop
        (it publishes a checkpoint first). Caller holds the lock."""
        job.cancel_requested = True
        if job.state == pb.JOB_STATE_PENDING:
            job.state = pb.JOB_STATE_CANCELLED
            self._record_state(job)
        elif job.process is not None:
            self._terminate(job)

    def watch(self, job_id: str, is_active: Callable[[], bool] = lambda: True) -> Iterator[pb.WatchJobResponse]:
        """The job's events from its start, then live ones, ending after its terminal state."""
        with self._cond:
            job = self._job(job_id)
        sent = 0
        while True:
            with self._cond:
                while sent == len(job.events) and job.state not in TERMINAL and not self._closed and is_active():
                    self._cond.wait(0.5)
                new, sent = job.events[sent:], len(job.events)
                over = job.state in TERMINAL or self._closed or not is_active()
            yield from new
            if over and sent == len(job.events):
                return

    def watch_checkpoints(self, only_new: bool = False,
                          is_active: Callable[[], bool] = lambda: True) -> Iterator[pb.CheckpointEvent]:
        """Every checkpoint publication (past ones first unless `only_new`), until the
        watcher leaves or the server shuts down."""
        with self._cond:  # `sent` counts publications since the server started, forgotten ones included
            sent = self._checkpoints_dropped + len(self._checkpoints) if only_new else self._checkpoints_dropped
        while True:
            with self._cond:
                while sent == self._checkpoints_dropped + len(self._checkpoints) and not self._closed and is_active():
                    self._cond.wait(0.5)
                new = self._checkpoints[max(0, sent - self._checkpoints_dropped):]
                sent = self._checkpoints_dropped + len(self._checkpoints)
                over = self._closed or not is_active()
            yield from new
            if over:
                return

    def shutdown(self) -> None:
        """Cancels every job (running ones publish their checkpoint), waits for their
        processes, then ends every stream."""
        with self._cond:
            self._closing = True
            for job in self._jobs.values():
                if job.state not in TERMINAL:
                    self._cancel_locked(job)
            runners = list(self._runners)
        for runner in runners:
            runner.join(self.cancel_timeout + 30)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        shutil.rmtree(self._work_dir, ignore_errors=True)

    # --- scheduling and the child process

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are forgotten beyond --keep_finished_jobs or after "
                           "--finished_job_retention seconds; their run directories stay)", field="id")
        return job

    def _schedule(self) -> None:
        """Starts PENDING jobs in order while slots are free (lock held)."""
        running = sum(1 for job in self._jobs.values() if job.state == pb.JOB_STATE_RUNNING)
        for job in self._jobs.values():
            if running >= self.max_concurrent_jobs or self._closing:
                return
            if job.state == pb.JOB_STATE_PENDING:
                job.state = pb.JOB_STATE_RUNNING
                self._record_state(job)
                runner = threading.Thread(target=self._run, args=(job,), name=f"job-{job.id}", daemon=True)
                self._runners.append(runner)
                runner.start()
                running += 1

    def _run(self, job: Job) -> None:
        """The job's runner thread: whatever happens, the job ends in a terminal state."""
        try:
            state, error = self._train(job)
        except Exception as exc:  # a bug of ours: fail the job instead of leaving it RUNNING forever
            LOG.exception("job runner failed", extra={"fields": {"job": job.id}})
            if job.process is not None and job.process.poll() is None:
                os.killpg(job.process.pid, signal.SIGKILL)
            state, error = pb.JOB_STATE_FAILED, f"internal error in the trainer service: {exc!r}"
        self._finish(job, state, error)

    def _train(self, job: Job) -> tuple[int, str]:
        """Runs the training process to its end; returns the job's final state and error."""
        config_path = self._work_dir / f"{job.id}.json"
        cfg.save_json(job.config, config_path)
        read_fd, write_fd = os.pipe()
        # OpenMP threads that spin while waiting (the default) made steps 8x slower on 2 cores
        # shared with other processes; passive waiting kept them as fast as one thread alone.
        env = {**os.environ, "OMP_NUM_THREADS": str(self.torch_threads),
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(_CODE_ROOT), os.environ.get("PYTHONPATH")]))}
        try:
            process = subprocess.Popen(
                [self.python, "-m", "services.trainer.worker", "--config", str(config_path), "--events_fd", str(write_fd),
                 "--parent_pid", str(os.getpid())],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, env=env, start_new_session=True)  # its own group: a terminal's Ctrl-C reaches the server only
        except OSError as exc:
            os.close(read_fd)
            return pb.JOB_STATE_FAILED, f"could not start the training process: {exc}"
        finally:
            os.close(write_fd)
        logs.log(LOG, logging.INFO, "job started", job=job.id, pid=process.pid)
        with self._cond:
            job.process = process
            if job.cancel_requested:
                self._terminate(job)
        output = threading.Thread(target=self._read_output, args=(job, process), daemon=True)
        output.start()
        with os.fdopen(read_fd) as events:
            for line in events:
                try:
                    self._apply(job, json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:  # not one of our events: keep it for the error
                    job.output.append(f"{line.rstrip()} ({exc!r})")
        code = process.wait()
        output.join()
        config_path.unlink(missing_ok=True)
        return self._outcome(job, code)

    def _read_output(self, job: Job, process: subprocess.Popen) -> None:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                job.output.append(line)
                logs.log(LOG, logging.DEBUG, line, job=job.id)
        process.stdout.close()

    def _outcome(self, job: Job, code: int) -> tuple[int, str]:
        if job.done is not None:
            return (pb.JOB_STATE_CANCELLED if job.done.get("cancelled") else pb.JOB_STATE_SUCCEEDED), ""
        if job.failure is not None:
            code = grpc.StatusCode.__members__.get(str(job.failure.get("code")), grpc.StatusCode.UNKNOWN)
            job.error_code = code.value[0]
            return pb.JOB_STATE_FAILED, job.failure.get("message", "")
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        if job.cancel_requested:  # stopped before its handler was installed, or killed after cancel_timeout
            return pb.JOB_STATE_CANCELLED, f"the training process ended with {how} before publishing"
        tail = "\n".join(job.output)
        return pb.JOB_STATE_FAILED, f"the training process exited with {how}" + (f":\n{tail}" if tail else "")

    def _terminate(self, job: Job) -> None:
        """SIGTERM to the job's process group, SIGKILL after `cancel_timeout` (lock held)."""
        process = job.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return

        def kill() -> None:
            if process.poll() is None:
                logs.log(LOG, logging.WARNING, "job ignored SIGTERM; killing it", job=job.id)
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        timer = threading.Timer(self.cancel_timeout, kill)
        timer.daemon = True
        timer.start()

    # --- events from the child

    def _apply(self, job: Job, event: dict) -> None:
        kind = event.get("event")
        with self._cond:
            if kind == "started":
                job.total_steps = int(event["total_steps"])
                job.step = int(event.get("resumed_step", 0))  # a resumed run starts where its checkpoint stood
                job.arguments = event["arguments"]
                job.series.started(job.total_steps, job.step)
                self._append(job, pb.WatchJobResponse(job=job.proto()))
            elif kind == "progress":
                job.step = int(event["step"])
                metrics.STEPS.inc()
                metrics.TOKENS.inc(event["tokens"])
                metrics.TRAINED_TOKENS.inc(event["trained_tokens"])
                metrics.STEP_DURATION.observe(event["seconds"])
                metrics.DATA_WAIT.observe(event["data_wait_seconds"])
                if "phase_seconds" in event:  # an online method's step
                    metrics.observe_phases(event["phase_seconds"])
                job.series.progress(job.step, event["tokens"], event["seconds"], event.get("phase_seconds"))
            elif kind == "step":
                step = pb.StepEvent(**_message_fields(pb.StepEvent, event))
                job.step = max(job.step, step.step)
                job.series.logged(step.loss, step.learning_rate)
                metrics.set_method_metrics(event.get("method", "sft"), step.metrics)
                self._append(job, pb.WatchJobResponse(step=step))
            elif kind == "eval":
                job.eval_losses[int(event["step"])] = float(event["eval_loss"])
                job.series.evaluated(event["eval_loss"])
                evaluated = pb.EvalEvent(**_message_fields(pb.EvalEvent, event))
                metrics.set_method_metrics(event.get("method", "sft"), evaluated.metrics)
                self._append(job, pb.WatchJobResponse(eval=evaluated))
            elif kind == "checkpoint":
                published = pb.CheckpointEvent(job_id=job.id, step=event["step"], path=event["path"],
                                               base_model=event["base_model"], adapter_name=event["adapter_name"],
                                               final=event["final"],
                                               eval_loss=job.eval_losses.get(int(event["step"])))
                if "published_at" in event:
                    published.publish_time.FromNanoseconds(round(event["published_at"] * 1e9))
                job.last_checkpoint = published.path
                metrics.CHECKPOINTS.inc()
                job.series.published()
                metrics.PUBLICATION_DURATION.observe(event["publish_seconds"])
                self._checkpoints.append(published)
                self._append(job, pb.WatchJobResponse(checkpoint=published))
                logs.log(LOG, logging.INFO, "checkpoint published", job=job.id, step=published.step, path=published.path)
            elif kind == "checkpoint_failed":
                metrics.PUBLICATION_FAILURES.inc()
            elif kind == "done":
                job.done = event
            elif kind == "error":
                job.failure = event

    def _append(self, job: Job, response: pb.WatchJobResponse) -> None:
        job.events.append(response)
        self._cond.notify_all()

    def _record_state(self, job: Job) -> None:
        """Announces a state change to watchers and metrics (lock held)."""
        ended = job.state in TERMINAL and job.finished_at is None  # counted once, however often recorded after
        if ended:
            job.finished_at = self._clock()
        self._append(job, pb.WatchJobResponse(job=job.proto()))
        self._update_job_metrics()
        if ended:
            metrics.JOBS_FINISHED.labels(state=state_name(job.state)).inc()
        if job.state in TERMINAL:
            job.series.remove()
        logs.log(LOG, logging.INFO, "job state", job=job.id, state=state_name(job.state), error=job.error or None)

    def _update_job_metrics(self) -> None:
        counts = collections.Counter(job.state for job in self._jobs.values())
        for state in STATES:
            metrics.JOBS.labels(state=state_name(state)).set(counts.get(state, 0))

    def _finish(self, job: Job, state: int, error: str) -> None:
        with self._cond:
            job.state, job.error = state, error
            self._record_state(job)
            self._schedule()
            self._forget_finished()

    def _forget_finished(self) -> list[str]:
        """Forgets finished jobs beyond `keep_finished_jobs` (oldest first) and those finished
        more than `finished_job_retention` seconds ago, with their publications at the front
        of the checkpoint feed; their run directories stay. Returns their ids (lock held)."""
        now = self._clock()
        finished = sorted((job for job in self._jobs.values() if job.state in TERMINAL and job.finished_at is not None),
                          key=lambda job: job.finished_at)
        excess = max(0, len(finished) - self.keep_finished_jobs)
        gone = [job.id for i, job in enumerate(finished)
                if i < excess or now - job.finished_at > self.finished_job_retention]
        for job_id in gone:
            del self._jobs[job_id]
        if gone:
            cut = 0
            while cut < len(self._checkpoints) and self._checkpoints[cut].job_id not in self._jobs:
                cut += 1
            del self._checkpoints[:cut]
            self._checkpoints_dropped += cut
            self._update_job_metrics()
            logs.log(LOG, logging.INFO, "finished jobs forgotten", jobs=gone, kept=len(self._jobs))
        return gone
