"""`tuneforge serve trainer` as its own process: SIGTERM while a job trains cancels it
gracefully (a checkpoint at its current step is published) and the server exits 0;
its /metrics page carries the trainer's metrics."""

import urllib.request

import pytest

from cli.stack import Stack
from libs.common import checkpoint
from services.trainer import client
from services.trainer.config import TrainConfig


@pytest.mark.slow
def test_sigterm_cancels_running_jobs_with_a_checkpoint(prepared_dataset, dataprep_address, tmp_path):
    run_dir = tmp_path / "run"
    with Stack(tmp_path / "logs") as stack:
        trainer = stack.start("trainer", ["--metrics_port", "0", "--torch_threads", "1", "--grace_period", "5"])
        job_id = client.submit(trainer.grpc_address, TrainConfig(
            dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(run_dir), max_steps=100000))
        for event in client.watch(trainer.grpc_address, job_id):
            if event.WhichOneof("event") == "step" and event.step.step >= 2:
                break
        page = urllib.request.urlopen(f"http://127.0.0.1:{trainer.ready['metrics_port']}/metrics", timeout=5).read().decode()
        for name in ("tuneforge_trainer_steps_total", "tuneforge_trainer_tokens_total",
                     "tuneforge_trainer_step_duration_seconds_bucket", "tuneforge_trainer_data_wait_seconds_count",
                     'tuneforge_trainer_jobs{state="running"} 1.0', "tuneforge_build_info{", "process_cpu_seconds_total",
                     f'tuneforge_trainer_loss{{job_id="{job_id}"}}', f'tuneforge_trainer_learning_rate{{job_id="{job_id}"}}',
                     f'tuneforge_trainer_tokens_per_second{{job_id="{job_id}"}}',
                     f'tuneforge_trainer_job_last_progress_timestamp_seconds{{job_id="{job_id}"}}'):
            assert name in page, name
        codes = stack.stop(grace=60)
    assert codes == {"trainer": 0}
    published = checkpoint.checkpoints(run_dir)
    assert len(published) == 1 and checkpoint.step_of(published[0]) >= 2
    checkpoint.verify(published[0])
    assert (published[0] / "adapter_model.safetensors").is_file()
