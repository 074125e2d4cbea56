"""The trainer service end to end on real parts: a real trainer gRPC server, a real dataprep
server feeding it over gRPC, real training child processes, real checkpoints on disk."""

import json
import os
import pathlib
import shutil
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from libs.common import checkpoint
from libs.common.errors import InvalidArgument, NotFound, Unavailable
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.trainer import client
from services.trainer.config import TrainConfig, to_arguments

S = pb.JobState


def arguments(dataset, dataprep_address, output_dir, **overrides) -> pb.TrainingArguments:
    values = dict(dataset=dataset, dataprep_address=dataprep_address, output_dir=str(output_dir),
                  lora_rank=16, lora_alpha=32, learning_rate=3e-3, lr_scheduler_type="constant", seed=0)
    return to_arguments(TrainConfig(**{**values, **overrides}))


def metric(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def kinds(events):
    return [event.WhichOneof("event") for event in events]


def test_health_is_serving(trainer):
    with grpc.insecure_channel(trainer.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tuneforge.trainer.v1.TrainerService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_bad_requests_list_every_problem_at_once(stub, tmp_path):
    request = pb.SubmitJobRequest(arguments=pb.TrainingArguments(
        dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "run"), train_type="full", quant_bits=4,
        lora_rank=0, model=str(tmp_path / "no-such-model"), modules_to_save=["lm_head"]))
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    for expected in ("lora_rank: must be positive; got 0", "quant_bits: 4-bit weights cannot be fully fine-tuned; use --train_type qlora",
                     "modules_to_save: only for lora and qlora",
                     "dataset: required", "model: model directory", "no-such-model"):
        assert expected in details
    assert not (tmp_path / "run").exists()  # no work started


def test_client_raises_typed_errors(trainer, tmp_path):
    with pytest.raises(InvalidArgument, match="lora_rank: must be positive") as caught:
        client.submit(trainer.address, TrainConfig(lora_rank=0, dataset="d", dataprep_address="127.0.0.1:1",
                                                 output_dir=str(tmp_path / "run")))
    assert "lora_alpha" not in str(caught.value)
    with pytest.raises(NotFound):
        client.get(trainer.address, "nope")
    with pytest.raises(Unavailable, match="trainer service at 127.0.0.1:1"):
        client.get("127.0.0.1:1", "any", timeout=2)


def test_unknown_job_is_not_found(stub):
    for call, request in ((stub.GetJob, pb.GetJobRequest(id="nope")), (stub.CancelJob, pb.CancelJobRequest(id="nope"))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.WatchJob(pb.WatchJobRequest(id="nope"), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_lora_job_trains_publishes_and_announces(trainer, stub, prepared_dataset, dataprep_address,
                                                 default_model, tmp_path):
    steps_before = metric("tuneforge_trainer_steps_total")
    published_before = metric("tuneforge_trainer_checkpoints_published_total")
    run_dir = tmp_path / "ada-run"
    started = time.monotonic()
    job = stub.SubmitJob(pb.SubmitJobRequest(arguments=arguments(
        prepared_dataset, dataprep_address, run_dir, max_steps=12, save_steps=6, per_device_train_batch_size=2,
        model_name="Ada", model_author="Bo")), timeout=30).job
    assert time.monotonic() - started < 2  # returns at once: training happens in the background
    assert job.id and job.state in (S.JOB_STATE_PENDING, S.JOB_STATE_RUNNING)

    events = list(stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300))
    states = [e.job.state for e in events if e.WhichOneof("event") == "job"]
    assert states[0] == S.JOB_STATE_PENDING and states[-1] == S.JOB_STATE_SUCCEEDED, states
    assert S.JOB_STATE_RUNNING in states
    final = events[-1].job
    assert (final.step, final.total_steps, final.error) == (12, 12, "")

    steps = [e.step for e in events if e.WhichOneof("event") == "step"]
    assert [s.step for s in steps] == list(range(1, 13))
    assert all(s.total_steps == 12 and s.tokens > 0 and s.tokens_per_second > 0 for s in steps)
    assert all(s.learning_rate == pytest.approx(3e-3) and s.grad_norm > 0 for s in steps)
    assert steps[-1].loss < steps[0].loss / 2, [round(s.loss, 3) for s in steps]

    published = [e.checkpoint for e in events if e.WhichOneof("event") == "checkpoint"]
    assert [(c.step, c.final) for c in published] == [(6, False), (12, True)]
    assert kinds(events).index("checkpoint") > kinds(events).index("step")
    for c in published:
        assert c.job_id == job.id and c.adapter_name == "ada-run"  # no adapter_name: the run dir's name
        assert pathlib.Path(c.base_model) == pathlib.Path(default_model).resolve()
        assert c.path == str(run_dir.resolve() / f"checkpoint-{c.step}")
    assert final.last_checkpoint == published[-1].path

    last = pathlib.Path(published[-1].path)
    checkpoint.verify(last)
    assert {"adapter_config.json", "adapter_model.safetensors", "args.json", "logging.jsonl",
            "trainer_state.json", "manifest.json"} <= {p.name for p in last.iterdir()}
    args = json.loads((last / "args.json").read_text())
    assert pathlib.Path(args["model"]).is_absolute() and args["model"] == str(pathlib.Path(default_model).resolve())
    assert (args["model_name"], args["model_author"], args["adapter_name"]) == ("Ada", "Bo", "ada-run")
    assert args["lora_rank"] == 16 and args["learning_rate"] == 3e-3 and args["versions"]["peft"]
    logged = [json.loads(line) for line in (last / "logging.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == list(range(1, 13))
    assert [entry["loss"] for entry in logged] == pytest.approx([s.loss for s in steps])
    assert (run_dir / "logging.jsonl").read_text() == (last / "logging.jsonl").read_text()
    assert json.loads((run_dir / "args.json").read_text()) == args
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 12
    adapter_config = json.loads((last / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["base_model_name_or_path"] == args["model"]

    # a late watcher gets the same history; the checkpoint feed replays both publications
    assert list(stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=30)) == events
    feed = stub.WatchCheckpoints(pb.WatchCheckpointsRequest())
    replayed = [next(feed).checkpoint for _ in range(2)]
    feed.cancel()
    assert [c.path for c in replayed] == [c.path for c in published]
    assert stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10).job == final
    assert job.id in [j.id for j in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs]

    assert metric("tuneforge_trainer_steps_total") - steps_before == 12
    assert metric("tuneforge_trainer_checkpoints_published_total") - published_before == 2
    assert metric("tuneforge_trainer_jobs", state="succeeded") >= 1

    # the same run directory is refused now that it holds checkpoints
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(pb.SubmitJobRequest(arguments=arguments(prepared_dataset, dataprep_address, run_dir)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already holds checkpoints" in caught.value.details()


@pytest.mark.slow
def test_cancel_publishes_the_current_step_and_the_queue_moves_on(trainer, stub, prepared_dataset,
                                                                   dataprep_address, tmp_path):
    address = trainer.address
    long_job = client.submit(address, TrainConfig(
        dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path / "long"),
        max_steps=100000, save_steps=100000, adapter_name="long-adapter"))
    queued = client.submit(address, TrainConfig(
        dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path / "queued")))
    # a dataset fit to train on when submitted (SubmitJob asks dataprep) and gone when its turn comes
    doomed = tmp_path / "doomed"
    shutil.copytree(prepared_dataset, doomed)
    broken = client.submit(address, TrainConfig(
        dataset=str(doomed), dataprep_address=dataprep_address, output_dir=str(tmp_path / "broken")))
    shutil.rmtree(doomed)

    announced = []
    with grpc.insecure_channel(address) as channel:
        feed = trainer_pb2_grpc.TrainerServiceStub(channel).WatchCheckpoints(pb.WatchCheckpointsRequest(only_new=True))

        def listen():
            try:
                announced.extend(response.checkpoint for response in feed)
            except grpc.RpcError as exc:  # ends when we cancel it
                assert exc.code() == grpc.StatusCode.CANCELLED

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()

        seen = []
        for event in client.watch(address, long_job):
            seen.append(event)
            # once: the next event may come before a third step (a stop seen between steps publishes at once)
            if event.WhichOneof("event") == "step" and len([e for e in seen if e.WhichOneof("event") == "step"]) == 2:
                # one job runs at a time: the others wait in submission order
                assert client.get(address, queued).state == S.JOB_STATE_PENDING
                assert client.get(address, broken).state == S.JOB_STATE_PENDING
                assert client.cancel(address, queued).state == S.JOB_STATE_CANCELLED
                client.cancel(address, long_job)
                client.cancel(address, long_job)  # idempotent
        final = seen[-1].job
        assert final.state == S.JOB_STATE_CANCELLED, final
        assert 2 <= final.step < 100000
        cancelled_at = [e.checkpoint for e in seen if e.WhichOneof("event") == "checkpoint"]
        assert [(c.step, c.final, c.adapter_name) for c in cancelled_at] == [(final.step, True, "long-adapter")]
        checkpoint.verify(cancelled_at[0].path)

        # the next in line runs (and fails with dataprep's own message); the cancelled one never ran
        with pytest.raises(client.JobFailed) as failed:
            client.wait(address, broken)
        assert failed.value.job.state == S.JOB_STATE_FAILED
        assert f"{doomed}: no such dataset directory" in failed.value.job.error
        assert not (tmp_path / "queued").exists()

        deadline = time.monotonic() + 10
        while not announced and time.monotonic() < deadline:
            time.sleep(0.05)
        feed.cancel()
        listener.join(10)
    assert [c.path for c in announced] == [cancelled_at[0].path]  # only_new: nothing from earlier tests


@pytest.mark.slow
def test_a_training_process_that_dies_fails_the_job_with_its_output(trainer, prepared_dataset, dataprep_address,
                                                                   tmp_path):
    job_id = client.submit(trainer.address, TrainConfig(
        dataset=prepared_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path / "doomed"),
        max_steps=100000))
    for event in client.watch(trainer.address, job_id):
        if event.WhichOneof("event") == "step":
            os.kill(trainer.jobs.process_id(job_id), signal.SIGKILL)
            break
    with pytest.raises(client.JobFailed) as failed:
        client.wait(trainer.address, job_id)
    assert "exited with signal SIGKILL" in failed.value.job.error


@pytest.fixture(scope="module")
def preference_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pairs")
    raw = root / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                    {"role": "assistant", "content": "An answer."}],
                                       "rejected_response": "I do not know."}) + "\n" for i in range(4)))
    from libs.dataset import client as dataprep_client
    from services.dataprep.config import PrepareConfig

    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared")))
    assert manifest["task"] == "preference"
    return str(root / "prepared")


def test_a_dataset_of_the_wrong_kind_is_refused_before_any_work(stub, prepared_dataset, preference_dataset,
                                                                 dataprep_address, tmp_path):
    cases = [
        # supervised training on pairs: before, trained silently on... nothing it could read (KeyError)
        (dict(dataset=preference_dataset), f"dataset: {preference_dataset} holds preference rows; supervised "
                                           "training (sft, pt) trains on conversations"),
        (dict(dataset=prepared_dataset, rlhf_type="dpo"),
         f"dataset: {prepared_dataset} holds sft rows; rlhf_type dpo trains on chosen/rejected pairs"),
        (dict(dataset=prepared_dataset, val_dataset=preference_dataset),
         f"val_dataset: {preference_dataset} holds preference rows"),
        (dict(dataset=preference_dataset, rlhf_type="kto", per_device_train_batch_size=2),  # kto needs 2 or more
         "rlhf_type kto trains on answers labelled desirable or undesirable"),
    ]
    for i, (fields, expected) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitJob(pb.SubmitJobRequest(arguments=arguments(dataprep_address=dataprep_address,
                                                                   output_dir=out, **fields)), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert expected in caught.value.details(), (fields, caught.value.details())
        assert not out.exists()  # no work started
