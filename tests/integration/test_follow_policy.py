"""The session stack's serving follows its trainer with the default --follow_policy final:
a job publishing checkpoints at steps 2 and 4 puts only its final one (step 4) into live
traffic; the intermediate one is logged as not promoted and never loaded. That one hot-load
is observed part by part in tuneforge_serving_adapter_load_part_seconds."""

import json
import re
import time
import urllib.request

import grpc
import pytest

from cli import demo
from libs.dataset import client as dataprep_client
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client
from services.trainer.config import TrainConfig

ADAPTER = "follow-final-test"


@pytest.mark.slow
def test_only_the_final_checkpoint_goes_live(stack, tmp_path):
    import openai

    model = str(stack.model_dir)
    demo.write_identity_dataset(tmp_path / "raw.jsonl", "Ferdinanda", "Policy Labs")
    dataprep_client.prepare(stack.dataprep, PrepareConfig(model=model, dataset=[str(tmp_path / "raw.jsonl")],
                                                          output_dir=str(tmp_path / "data")))
    run_dir = tmp_path / "run"
    before = load_parts(stack)
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        model=model, dataset=str(tmp_path / "data"), dataprep_address=stack.dataprep, output_dir=str(run_dir),
        adapter_name=ADAPTER, max_steps=4, save_steps=2, per_device_train_batch_size=4, lora_rank=8)))
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    final = str(run_dir / "checkpoint-4")

    deadline = time.monotonic() + 60
    with grpc.insecure_channel(stack.serving_grpc) as channel:
        stub = serving_pb2_grpc.AdapterServiceStub(channel)
        while True:
            listed = {a.name: a for a in stub.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}
            if ADAPTER in listed and listed[ADAPTER].state == serving_pb2.ADAPTER_STATE_READY:
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
    assert listed[ADAPTER].path == final
    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="test")
    assert ADAPTER in [m.id for m in client.models.list().data]

    entries = [json.loads(line) for line in (stack.log_dir / "serving.log").read_text().splitlines()
               if line.startswith("{")]
    ours = [e for e in entries if e.get("adapter") == ADAPTER]
    assert [(e["step"], e["reason"]) for e in ours if e["msg"] == "published checkpoint not promoted"] == [
        (2, "not the job's final checkpoint")]
    assert [e["path"] for e in ours if e["msg"] == "published checkpoint serving"] == [final]

    # one load, each part observed once: delivery (a live publication), verification, registration,
    # the first request. A loose bound only: the 1 s of issue 17 is bench/serving_hotload.py's to
    # show (about 22 ms in all there, median of 5 rounds)
    after = load_parts(stack)
    counts = {part: after[part][1] - before[part][1] for part in PARTS}
    seconds = {part: after[part][0] - before[part][0] for part in PARTS}
    assert counts == {part: 1 for part in PARTS}, seconds
    assert all(seconds[part] > 0 for part in PARTS if part != "delivery"), seconds
    assert 0 <= seconds["delivery"] and sum(seconds.values()) < 10, seconds
    (ready,) = [e for e in ours if e["msg"] == "adapter ready"]
    assert ready["first_request_seconds"] == pytest.approx(seconds["first_request"], abs=1e-4)


PARTS = ("delivery", "verification", "registration", "first_request")


def load_parts(stack) -> dict[str, tuple[float, float]]:
    """part -> (sum, count) of serving's hot-load parts histogram, from its /metrics page."""
    page = urllib.request.urlopen(f"{stack.serving_http}/metrics", timeout=10).read().decode()
    found = {part: [0.0, 0.0] for part in PARTS}
    for kind, part, value in re.findall(
            r'^tuneforge_serving_adapter_load_part_seconds_(sum|count)\{part="(\w+)"\} (\S+)$', page, re.M):
        found[part][kind == "count"] = float(value)
    return {part: (total, count) for part, (total, count) in found.items()}
