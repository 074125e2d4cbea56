"""Client helpers for the trainer service: submit a job, follow it, wait for its end.
gRPC failures come back as the typed errors of libs.common.errors."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import grpc

from libs.common import channels
from libs.common.errors import FailedPrecondition, code_from_number, from_rpc_error
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.trainer.config import TrainConfig, to_arguments


class JobFailed(FailedPrecondition):
    """The job ended FAILED; `job` is its final state. Its status code is the one the training
    process reported (RESOURCE_EXHAUSTED for a full disk, ...), FAILED_PRECONDITION when none."""

    def __init__(self, job: pb.Job):
        super().__init__(f"training job {job.id} failed: {job.error}", field="job")
        self.job = job
        if job.error_code:
            self.code = code_from_number(job.error_code)


@contextlib.contextmanager
def _stub(address: str) -> Iterator[trainer_pb2_grpc.TrainerServiceStub]:
    with channels.open_channel(address) as channel:
        try:
            yield trainer_pb2_grpc.TrainerServiceStub(channel)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, "trainer", address) from None


def submit(address: str, config: TrainConfig, timeout: float = 30.0) -> str:
    """Submits a job; returns its id at once (training goes on in the service)."""
    with _stub(address) as stub:
        return stub.SubmitJob(pb.SubmitJobRequest(arguments=to_arguments(config)), timeout=timeout).job.id


def get(address: str, job_id: str, timeout: float = 30.0) -> pb.Job:
    with _stub(address) as stub:
        return stub.GetJob(pb.GetJobRequest(id=job_id), timeout=timeout).job


def cancel(address: str, job_id: str, timeout: float = 30.0) -> pb.Job:
    with _stub(address) as stub:
        return stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=timeout).job


def watch(address: str, job_id: str) -> Iterator[pb.WatchJobResponse]:
    """The job's events from its start until it ends (state changes, steps, checkpoints)."""
    with _stub(address) as stub:
        yield from stub.WatchJob(pb.WatchJobRequest(id=job_id))


def wait(address: str, job_id: str, on_event: Callable[[pb.WatchJobResponse], None] | None = None) -> pb.Job:
    """Follows the job to its end and returns its final state; raises JobFailed if it FAILED."""
    final = None
    for event in watch(address, job_id):
        if on_event is not None:
            on_event(event)
        if event.WhichOneof("event") == "job":
            final = event.job
    if final is None or final.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        final = get(address, job_id)  # the stream ended early (server shutting down)
    if final.state == pb.JOB_STATE_FAILED:
        raise JobFailed(final)
    return final
