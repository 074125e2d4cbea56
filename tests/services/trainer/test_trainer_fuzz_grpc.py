"""TrainerService fuzzed over real gRPC on 127.0.0.1: requests built from the proto descriptors
(tests/grpc_fuzz.py), biased toward plausible-but-wrong values (real model directories, run
directories that already hold checkpoints, checkpoints with broken manifests, DeepSpeed files
of every wrong shape, real job ids). Every reply is a proper status code naming the field,
never UNKNOWN or INTERNAL; a job is accepted only with finite numbers; the server stays
SERVING and keeps answering normal requests.

No fuzzed job ever trains: the server runs one job at a time and its one slot is held by a
real job whose training process the test stops (SIGSTOP) as soon as it starts, so every job a
fuzzed request submits waits PENDING and is cancelled before it can start. An accepted
nproc_per_node of 2**31 - 1 must never reach torchrun on a shared 2-core machine."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import grpc
import pytest
from hypothesis import given, settings, strategies as st

from libs.common import checkpoint
from libs.common.server import create_server
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from protos.tuneforge.trainer.v1 import trainer_pb2_grpc
from services.trainer.config import TrainConfig, to_arguments
from services.trainer.jobs import JobManager
from services.trainer.servicer import SERVICE_NAME, register
from tests.grpc_fuzz import (ODD_TEXT, assert_serving, check, constructor, messages, reached, stream, unary)

S = pb.JobState
TERMINAL = (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)


def mostly(valid: list, wrong: list) -> st.SearchStrategy:
    """A field's value: valid nine times in ten, so that requests with forty fields still get
    past validation now and then, and wrong otherwise."""
    return st.sampled_from(valid * max(1, 9 * len(wrong) // len(valid)) + wrong)


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_model, prepared_dataset, dataprep_address):
    """Real directories and files the strategies point at (the trainer only reads them)."""
    root = tmp_path_factory.mktemp("trainer-fuzz")
    (root / "no-model").mkdir()
    (root / "bad-model").mkdir()
    (root / "bad-model" / "config.json").write_text("[1, 2]")
    (root / "notes.txt").write_text("not a directory\n")
    (root / "used-run" / "checkpoint-5").mkdir(parents=True)

    def fake_checkpoint(name: str, adapter: bool = True):
        def fill(tmp):
            (tmp / "trainer_state.json").write_text(json.dumps({"step": 5}))
            (tmp / "training_state.pt").write_bytes(b"not a torch pickle")
            if adapter:
                (tmp / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))

        return checkpoint.publish(root / "runs" / name / "checkpoint-5", fill)

    checkpoints = {"lora": fake_checkpoint("lora"), "full": fake_checkpoint("full", adapter=False)}
    for name, manifest in {"manifest-not-json": "{", "manifest-list": "[]", "files-list": '{"files": []}',
                           "entry-no-sha": '{"files": {"trainer_state.json": {}}}',
                           "entry-not-dict": '{"files": {"trainer_state.json": 5}}'}.items():
        broken = fake_checkpoint(name)
        (broken / "manifest.json").write_text(manifest)
        checkpoints[name] = broken
    (root / "runs" / "no-manifest").mkdir()
    checkpoints["no-manifest"] = root / "runs" / "no-manifest"

    deepspeed = {}
    for name, text in {
        "ok": "{}", "stage7": '{"zero_optimization": {"stage": 7}}', "zero-not-dict": '{"zero_optimization": 5}',
        "stage-list": '{"zero_optimization": {"stage": [2]}}', "owned": '{"optimizer": {}}', "list": "[]",
        "broken": "{", "offload": '{"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}',
    }.items():
        deepspeed[name] = root / f"ds-{name}.json"
        deepspeed[name].write_text(text)
    (root / "ds-binary.json").write_bytes(b"\xff\xfe\x00")
    (root / "ds-dir.json").mkdir()
    deepspeed_files = [str(p) for p in deepspeed.values()] + [str(root / "ds-binary.json"), str(root / "ds-dir.json")]
    return {"root": root, "default_model": default_model, "checkpoints": checkpoints, "deepspeed": deepspeed_files,
            # a real prepared dataset on a real dataprep server: SubmitJob asks it what the dataset is
            "held": prepared_dataset, "dataprep": dataprep_address}


@pytest.fixture(scope="module")
def trainer(files):
    """A real trainer server on 127.0.0.1:0 running one job at a time, that slot held by a real
    job whose training process is stopped (SIGSTOP) at once, so fuzzed jobs only ever queue."""
    jobs = JobManager(max_concurrent_jobs=1, cancel_timeout=1, torch_threads=1)
    server, port, _health = create_server("127.0.0.1:0", lambda s: register(s, jobs), "trainer")
    holder = jobs.submit(TrainConfig(dataset="held", dataprep_address="127.0.0.1:1", max_steps=1,
                                   output_dir=str(files["root"] / "held")))
    deadline = time.monotonic() + 30
    while (pid := jobs.process_id(holder.id)) is None:
        assert time.monotonic() < deadline, "the holding job's training process did not start"
        time.sleep(0.005)
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield {"address": f"127.0.0.1:{port}", "jobs": jobs, "holder": holder.id}
    finally:
        jobs.cancel(holder.id)  # SIGTERM waits while it is stopped; SIGKILL follows after cancel_timeout
        jobs.shutdown()
        server.stop(1).wait()


@pytest.fixture(scope="module")
def stub(trainer):
    with grpc.insecure_channel(trainer["address"]) as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)


def holder_still_running(stub, trainer) -> None:
    job = stub.GetJob(pb.GetJobRequest(id=trainer["holder"]), timeout=10).job
    assert job.state == S.JOB_STATE_RUNNING, f"the job holding the slot ended, fuzzed jobs could train: {job}"


def not_finite(message) -> list[str]:
    """The set float fields of `message` (and the messages in it) holding NaN or an infinity."""
    found = []
    for field, value in message.ListFields():
        if field.message_type is not None and not field.is_repeated:
            found += [f"{field.name}.{name}" for name in not_finite(value)]
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE) and not math.isfinite(value):
            found.append(field.name)
    return found


# --- SubmitJob ---------------------------------------------------------------------------------


def submit_requests(files, trainer):
    root = files["root"]
    ckpts = files["checkpoints"]
    nan, inf = float("nan"), float("inf")
    plausible = {
        "TrainingArguments.model": mostly(["", str(files["default_model"])],
                                          [str(root / "no-model"), str(root / "bad-model"), str(root / "notes.txt"),
                                           str(root / "missing"), "\x00", "x" * 300, "~no-such-user/x"]),
        "TrainingArguments.dataset": mostly([files["held"], str(root / "data")], ["", "\x00"]),
        "TrainingArguments.dataprep_address": mostly([files["dataprep"], files["dataprep"], "127.0.0.1:1"],
                                                     ["", "no port", "[::1]:99999"]),
        "TrainingArguments.output_dir": mostly(
            [str(root / "out" / "a"), str(root / "out" / "é 日本"), "relative-run"],
            [str(root / "used-run"), str(root / "held"), str(root / "notes.txt"), str(root / "notes.txt" / "x"), "",
             "\x00", "x" * 300, "a/" * 2100]),
        "TrainingArguments.train_type": mostly(["lora", "full"], ["qlora", "LoRA", "dpo"]),
        "TrainingArguments.target_modules": mostly(["all-linear", "q_proj", "v_proj"], ["nope", "", "all-linear "]),
        "TrainingArguments.modules_to_save": mostly(["lm_head"], ["nope", ""]),
        "TrainingArguments.lora_rank": mostly([8, 16, 1], [0, -1, 2**31 - 1]),
        "TrainingArguments.lora_alpha": mostly([16, 32], [0, -1]),
        "TrainingArguments.lora_dropout": mostly([0.0, 0.05], [1.0, -0.1, nan, inf]),
        "TrainingArguments.learning_rate": mostly([1e-4, 3e-3], [0.0, -1.0, nan, inf]),
        "TrainingArguments.lr_scheduler_type": mostly(["cosine", "linear", "constant"], ["step", ""]),
        "TrainingArguments.warmup_ratio": mostly([0.0, 0.1], [1.5, -0.1, nan]),
        "TrainingArguments.weight_decay": mostly([0.0, 0.1], [-1.0, nan, inf]),
        "TrainingArguments.max_grad_norm": mostly([0.0, 1.0], [-1.0, nan, inf]),
        "TrainingArguments.per_device_train_batch_size": mostly([1, 2], [0, -1, 2**31 - 1]),
        "TrainingArguments.gradient_accumulation_steps": mostly([1, 4], [0, -1]),
        "TrainingArguments.num_train_epochs": mostly([1.0, 0.5, 3.0], [0.0, -1.0, nan, inf]),
        "TrainingArguments.max_steps": mostly([-1, 1, 10], [0, -2, 2**31 - 1]),
        "TrainingArguments.save_steps": mostly([1, 500], [0, -1]),
        "TrainingArguments.logging_steps": mostly([1, 5], [0, -1]),
        "TrainingArguments.seed": mostly([0, 42], [-1, 2**31 - 1]),
        "TrainingArguments.adapter_name": mostly(["ada", "self-cognition"], ["", "has space", "x" * 300]),
        "TrainingArguments.torch_dtype": mostly(["float32", "bfloat16"], ["fp16", "auto"]),
        "TrainingArguments.resume_from_checkpoint": mostly(
            ["", str(ckpts["lora"])],
            [str(p) for name, p in ckpts.items() if name != "lora"] + [str(root / "notes.txt"), str(root / "missing")]),
        "TrainingArguments.nproc_per_node": mostly([1, 2], [0, -1, 2**31 - 1]),
        "TrainingArguments.nnodes": mostly([1, 2], [0, -1]),
        "TrainingArguments.node_rank": mostly([0, 1], [-1, 2]),
        "TrainingArguments.master_addr": mostly(["127.0.0.1"], ["", "no such host"]),
        "TrainingArguments.master_port": mostly([29500], [0, -1, 65536]),
        "TrainingArguments.deepspeed": mostly(["zero2", "zero3"], files["deepspeed"] + ["zero4", "missing.json"]),
        "TrainingArguments.ddp_timeout": mostly([1800, 60], [0, -1]),
        "TrainingArguments.quant_bits": mostly([4], [8, 0, -4]),
        "TrainingArguments.save_total_limit": mostly([1, 3], [0, -1]),
        "TrainingArguments.eval_steps": mostly([1, 10], [0, -1]),
        "TrainingArguments.split_dataset_ratio": mostly([0.0, 0.1], [1.0, -0.5, nan, inf]),
        "TrainingArguments.val_dataset": mostly(["", "held-eval"], ["\x00"]),
        "TrainingArguments.model_name": mostly(["Ada"], list(ODD_TEXT)),
        "TrainingArguments.model_author": mostly(["Bo"], list(ODD_TEXT)),
    }
    lists = {key: st.lists(plausible[key], max_size=3)
             for key in ("TrainingArguments.target_modules", "TrainingArguments.modules_to_save")}
    required = {key: plausible[key] for key in ("TrainingArguments.dataset", "TrainingArguments.dataprep_address",
                                                "TrainingArguments.output_dir")}
    # Mostly valid: the fields a job needs, and each other field set once in eight draws, so that
    # validation of forty fields is passed now and then.
    def rarely(values):
        return st.one_of(st.none(), st.none(), st.none(), values)

    sparse = messages(pb.SubmitJobRequest, only={
        **{key: rarely(value) for key, value in {**plausible, **lists}.items() if key not in required}, **required})
    anything = messages(pb.SubmitJobRequest, hints=plausible)
    return st.one_of(sparse, sparse, anything)


def test_submit_job_fuzz(stub, trainer, files):
    requests = submit_requests(files, trainer)
    queued = []

    @settings(max_examples=settings().max_examples)
    @given(request=requests)
    def fuzz(request):
        reply = unary(stub.SubmitJob, request)
        check(reply, request)
        if reply.code == grpc.StatusCode.OK:
            job = reply.messages[0].job
            # cancelled first: whatever the assertions below say, it must not wait for a slot
            cancelled = stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10).job
            queued.append(job.id)
            assert job.state == S.JOB_STATE_PENDING, f"{constructor(request)}: a fuzzed job started: {job}"
            assert cancelled.state == S.JOB_STATE_CANCELLED, cancelled
            assert not not_finite(request), \
                f"{constructor(request)} was accepted with {not_finite(request)} not finite"

    fuzz()
    print(f"jobs accepted (and cancelled while pending): {len(queued)}")
    assert {"OK", "INVALID_ARGUMENT"} <= set(reached(pb.SubmitJobRequest))
    holder_still_running(stub, trainer)
    assert_serving(trainer["address"], [SERVICE_NAME])
    listed = {job.id: job.state for job in stub.ListJobs(pb.ListJobsRequest(), timeout=10).jobs}
    assert all(listed[job_id] == S.JOB_STATE_CANCELLED for job_id in queued)
    normal = stub.SubmitJob(pb.SubmitJobRequest(arguments=to_arguments(TrainConfig(
        dataset=files["held"], dataprep_address=files["dataprep"], output_dir=str(files["root"] / "normal")))), timeout=30).job
    assert normal.state == S.JOB_STATE_PENDING
    assert stub.CancelJob(pb.CancelJobRequest(id=normal.id), timeout=10).job.state == S.JOB_STATE_CANCELLED


# --- GetJob, WatchJob, CancelJob, ListJobs, WatchCheckpoints -----------------------------------


@pytest.fixture(scope="module")
def cancelled_id(stub, files):
    job = stub.SubmitJob(pb.SubmitJobRequest(arguments=to_arguments(TrainConfig(
        dataset=files["held"], dataprep_address=files["dataprep"], output_dir=str(files["root"] / "cancelled")))), timeout=30).job
    assert stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10).job.state == S.JOB_STATE_CANCELLED
    return job.id


def test_job_ids_fuzz(stub, trainer, cancelled_id):
    holder = trainer["holder"]
    near = [holder.upper(), holder[:8], holder + " ", cancelled_id + "\x00"]
    # CancelJob never gets the holder's id: cancelling it would free the slot for fuzzed jobs.
    cases = ((stub.GetJob, pb.GetJobRequest, [holder, cancelled_id], False),
             (stub.WatchJob, pb.WatchJobRequest, [holder, cancelled_id], True),
             (stub.CancelJob, pb.CancelJobRequest, [cancelled_id], False))

    @settings(max_examples=settings().max_examples // 2)
    @given(data=st.data())
    def fuzz(data):
        for method, request_type, ids, streams in cases:
            request = data.draw(messages(request_type, hints={f"{request_type.__name__}.id": st.sampled_from(ids + near)}))
            if streams:  # the holder's stream replays its two states (PENDING, RUNNING), then waits
                reply = stream(method, request, timeout=2, limit=2 if request.id == holder else 100)
                check(reply, request, may_stay_open=request.id == holder)
            else:
                reply = unary(method, request)
                check(reply, request)
            assert (reply.code != grpc.StatusCode.NOT_FOUND) == (request.id in ids), (constructor(request), reply)

    fuzz()
    for request_type in (pb.GetJobRequest, pb.WatchJobRequest, pb.CancelJobRequest):
        assert {"OK", "NOT_FOUND"} <= set(reached(request_type))
    for request in (pb.ListJobsRequest(), pb.WatchCheckpointsRequest(), pb.WatchCheckpointsRequest(only_new=True)):
        method = stub.ListJobs if isinstance(request, pb.ListJobsRequest) else stub.WatchCheckpoints
        reply = unary(method, request) if method is stub.ListJobs else stream(method, request, timeout=1)
        check(reply, request, may_stay_open=method is stub.WatchCheckpoints)  # no checkpoint was ever published
    holder_still_running(stub, trainer)
    assert_serving(trainer["address"], [SERVICE_NAME])
    assert stub.GetJob(pb.GetJobRequest(id=cancelled_id), timeout=10).job.state == S.JOB_STATE_CANCELLED


# --- regressions: the minimal examples the fuzzers printed ----------------------------------------


def submitted(stub, files, **arguments):
    request = pb.SubmitJobRequest(arguments=pb.TrainingArguments(
        dataset=files["held"], dataprep_address=files["dataprep"], output_dir=str(files["root"] / "out" / "a"),
        **arguments))
    return unary(stub.SubmitJob, request)


def test_an_unusable_model_path_is_an_invalid_argument(stub, files):
    # was UNKNOWN: "Exception calling application: [Errno 36] File name too long: 'xxx...'"
    reply = submitted(stub, files, model="x" * 300)
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
    assert reply.details == f"model: {'x' * 80 + '...'!r} has a 300-byte name ({'x' * 24}...); names on this " \
                            "system are at most 255 bytes"


def test_a_number_that_is_not_finite_is_refused(stub, files):
    # was OK: a job accepted with max_grad_norm nan (every `<` check passes NaN)
    reply = submitted(stub, files, max_grad_norm=float("nan"))
    assert (reply.code, reply.details) == (grpc.StatusCode.INVALID_ARGUMENT, "max_grad_norm: must be a finite number; got nan")
    reply = submitted(stub, files, lora_dropout=float("inf"), learning_rate=float("nan"))
    assert reply.details == "lora_dropout: must be a finite number; got inf; learning_rate: must be a finite number; got nan"


def test_a_checkpoint_whose_manifest_is_not_json_cannot_be_resumed(stub, files):
    # was UNKNOWN: "Exception calling application: Expecting property name enclosed in double quotes: line 1 column 2"
    broken = files["checkpoints"]["manifest-not-json"]
    reply = submitted(stub, files, resume_from_checkpoint=str(broken))
    assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, reply
    assert reply.details.startswith(f"resume_from_checkpoint: {broken / 'manifest.json'} is not valid JSON: "), reply
    for name in ("manifest-list", "files-list", "entry-no-sha", "entry-not-dict"):
        reply = submitted(stub, files, resume_from_checkpoint=str(files["checkpoints"][name]))
        assert reply.details.startswith(f"resume_from_checkpoint: {files['checkpoints'][name] / 'manifest.json'} "
                                        "is not a checkpoint manifest"), reply


def test_a_deepspeed_file_whose_zero_optimization_is_not_an_object_is_refused(stub, files):
    # was UNKNOWN: "Exception calling application: 'int' object has no attribute 'get'"
    path = files["root"] / "ds-zero-not-dict.json"
    reply = submitted(stub, files, deepspeed=str(path))
    assert (reply.code, reply.details) == (
        grpc.StatusCode.INVALID_ARGUMENT, f"deepspeed: {path}: zero_optimization: expected a JSON object; got 5")


def test_a_model_in_the_home_of_no_user_is_not_found(stub, files):
    # was UNKNOWN: "Exception calling application: Could not determine home directory."
    reply = submitted(stub, files, model="~no-such-user/x")
    assert (reply.code, reply.details) == (grpc.StatusCode.INVALID_ARGUMENT, (
        "model: '~no-such-user/x': ~no-such-user names the home of user 'no-such-user', who does not exist"))


def test_the_largest_float32_is_taken_as_it_is(stub, files):
    # was UNKNOWN: "Exception calling application: float too large to pack with f format" (3.4e38, its
    # shortest decimal, rounds past float32's largest)
    reply = submitted(stub, files, num_train_epochs=3.4028234663852886e38)
    assert reply.code == grpc.StatusCode.OK, reply
    job = reply.messages[0].job
    assert stub.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10).job.state == S.JOB_STATE_CANCELLED
    assert json.loads(job.arguments_json)["num_train_epochs"] == 3.4028235e38  # its shortest float32 decimal
