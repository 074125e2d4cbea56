"""`tuneforge serve trainer`: the trainer service process."""

from __future__ import annotations

from libs.common import config as cfg
from libs.common import server
from services.trainer.config import TrainerServerConfig
from services.trainer.jobs import JobManager
from services.trainer.servicer import register


def main(argv: list[str]) -> int:
    config = cfg.parse(TrainerServerConfig, argv, prog="tuneforge serve trainer")
    jobs = JobManager(max_concurrent_jobs=config.max_concurrent_jobs, cancel_timeout=config.cancel_timeout,
                      torch_threads=config.torch_threads, keep_finished_jobs=config.keep_finished_jobs,
                      finished_job_retention=config.finished_job_retention)
    # On SIGTERM running jobs are cancelled: each publishes a checkpoint at its current step.
    server.run("trainer", server.options_of(config), lambda grpc_server: register(grpc_server, jobs),
               on_shutdown=jobs.shutdown)
    return 0
