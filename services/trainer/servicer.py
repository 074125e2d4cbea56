"""TrainerService over gRPC: maps requests onto the JobManager and typed errors onto status codes."""

from __future__ import annotations

import grpc

from libs.common.errors import grpc_errors
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.trainer import dataset_check
from services.trainer.config import from_arguments
from services.trainer.jobs import JobManager

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    @grpc_errors
    def SubmitJob(self, request: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        config = from_arguments(request.arguments)  # every problem at once, INVALID_ARGUMENT
        dataset_check.check(config)  # the datasets' kinds fit the method (asks dataprep)
        return pb.SubmitJobResponse(job=self.jobs.submit(config))

    @grpc_errors
    def GetJob(self, request: pb.GetJobRequest, context) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=self.jobs.get(request.id))

    @grpc_errors
    def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=self.jobs.list_jobs())

    @grpc_errors
    def WatchJob(self, request: pb.WatchJobRequest, context):
        yield from self.jobs.watch(request.id, is_active=context.is_active)

    @grpc_errors
    def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=self.jobs.cancel(request.id))

    @grpc_errors
    def WatchCheckpoints(self, request: pb.WatchCheckpointsRequest, context):
        for published in self.jobs.watch_checkpoints(only_new=request.only_new, is_active=context.is_active):
            yield pb.WatchCheckpointsResponse(checkpoint=published)


def register(server: grpc.Server, jobs: JobManager) -> list[str]:
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(jobs), server)
    return [SERVICE_NAME]
