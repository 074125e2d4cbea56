"""A QLoRA job through the real trainer service publishes PEFT adapters and resumes exactly,
and the trainer's /metrics page (served over HTTP as the service does) counts its steps,
tokens, data wait, step time, checkpoints and jobs by state, removes the jobs' own series
when they end, and passes `promtool check metrics`."""

import json
import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common import checkpoint
from libs.common.metrics import serve_metrics
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.trainer import client
from services.trainer.config import TrainConfig


@pytest.fixture(scope="module")
def metrics_url():
    httpd, port = serve_metrics("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}/metrics"
    httpd.shutdown()


def samples(url) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("tuneforge_trainer_")}


def value(page, name, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def logged(run_dir):
    return [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_qlora_job_publishes_adapters_resumes_exactly_and_is_counted(trainer, prepared_dataset, dataprep_address,
                                                                     metrics_url, tmp_path):
    before = samples(metrics_url)
    values = dict(dataset=prepared_dataset, dataprep_address=dataprep_address, train_type="qlora", max_steps=4,
                  save_steps=2, per_device_train_batch_size=2, learning_rate=3e-3, val_dataset=prepared_dataset,
                  eval_steps=4, seed=3)
    run_dir = tmp_path / "qlora"
    job = client.wait(trainer.address, client.submit(trainer.address, TrainConfig(output_dir=str(run_dir), **values)))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    final = run_dir / "checkpoint-4"
    checkpoint.verify(final)
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the 4-bit base is not republished
    assert json.loads((final / "args.json").read_text())["train_type"] == "qlora"
    losses = [e["loss"] for e in logged(run_dir) if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]

    # resumed from checkpoint-2: steps 3 and 4 bitwise as the uninterrupted run
    resumed = tmp_path / "resumed"
    job = client.wait(trainer.address, client.submit(trainer.address, TrainConfig(
        output_dir=str(resumed), resume_from_checkpoint=str(run_dir / "checkpoint-2"), **values)))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    trajectory = [(e["step"], e["loss"], e["grad_norm"]) for e in logged(resumed) if "loss" in e]
    assert trajectory == [(e["step"], e["loss"], e["grad_norm"]) for e in logged(run_dir) if "loss" in e]

    after = samples(metrics_url)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("tuneforge_trainer_steps_total") == 4 + 2
    assert grew("tuneforge_trainer_tokens_total") > 0 and grew("tuneforge_trainer_trained_tokens_total") > 0
    assert grew("tuneforge_trainer_data_wait_seconds_count") == 6
    assert grew("tuneforge_trainer_step_duration_seconds_count") == 6
    assert grew("tuneforge_trainer_checkpoints_published_total") == 2 + 1
    assert grew("tuneforge_trainer_checkpoint_publication_duration_seconds_count") == 3
    assert value(after, "tuneforge_trainer_jobs", state="succeeded") >= 2
    assert grew("tuneforge_trainer_jobs_finished_total", state="succeeded") == 2
    # the per-job series (loss, learning rate, eval loss, tokens/s, ...) went with the jobs
    assert not [name for name, labels in after if "job_id" in dict(labels)]


def test_metrics_page_passes_promtool(metrics_url):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    from services.trainer import metrics  # noqa: F401  the trainer's names are registered

    text = urllib.request.urlopen(metrics_url, timeout=10).read()
    assert b"tuneforge_trainer_data_wait_seconds_bucket" in text and b"tuneforge_build_info{" in text
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
