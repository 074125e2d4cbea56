"""What the follower promotes into live traffic (--follow_policy, --follow_jobs): the rules
on their own, then against the real trainer service in this process training a job with
eval (its checkpoint events carry the eval loss at their step): `final` serves the job's
last checkpoint only, `best` each one whose eval loss beats the job's earlier ones, and an
adapter no --follow_jobs pattern matches is not followed. The registry's engine records
loads (conftest's recording_engine); the stack's real vLLM path is tests/integration's. Last, the
follower reaches a trainer that requires mutual TLS through the shared channel factory."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib

import pytest

from libs.common.errors import Problems
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.serving.adapters import AdapterRegistry
from services.serving.config import parse_follow_jobs
from services.serving.follow import CheckpointFollower, FollowPolicy
from services.trainer import client
from services.trainer.config import TrainConfig


def event(job="j", step=1, final=False, eval_loss=None, name="ada"):
    return pb.CheckpointEvent(job_id=job, step=step, path=f"/runs/{job}/checkpoint-{step}", adapter_name=name,
                              final=final, eval_loss=eval_loss)


def test_policies_decide_by_final_eval_loss_and_adapter_pattern():
    final = FollowPolicy()
    assert final.promotes(event(step=2)) == (False, "not the job's final checkpoint")
    assert final.promotes(event(step=4, final=True)) == (True, "the job's final checkpoint")
    assert FollowPolicy("all").promotes(event(step=2)) == (True, "follow_policy all")

    best = FollowPolicy("best")
    assert best.promotes(event(step=1)) == (False, "no eval loss at its step (follow_policy best)")
    assert best.promotes(event(step=2, eval_loss=2.0))[0]
    assert best.promotes(event(step=4, eval_loss=2.5)) == (False, "eval loss 2.5 does not beat the job's best 2")
    assert best.promotes(event(step=5, eval_loss=2.0)) == (False, "eval loss 2 does not beat the job's best 2")
    assert best.promotes(event(step=6, eval_loss=1.5, final=True)) == (True, "the job's best eval loss so far (1.5)")
    # each job is judged on its own: a new job's first evaluated checkpoint goes live even if worse
    assert best.promotes(event(job="k", step=2, eval_loss=9.0)) == (True, "the job's best eval loss so far (9)")

    rules = FollowPolicy("final", parse_follow_jobs(["prod-*=best", "exp-*", "*-nightly=all"]))
    assert rules.policy_of("prod-ada") == "best" and rules.policy_of("exp-1") == "final"
    assert rules.policy_of("x-nightly") == "all" and rules.policy_of("other") is None
    assert rules.promotes(event(name="other", final=True)) == (
        False, "no --follow_jobs pattern matches its adapter name")
    with pytest.raises(Problems) as info:
        parse_follow_jobs(["=best", "a=sometimes", "ok=all"])
    assert info.value.problems == ["follow_jobs: expected PATTERN or PATTERN=POLICY; got '=best'",
                                   "follow_jobs: 'a=sometimes': policy must be one of final, best, all; got 'sometimes'"]


@pytest.mark.slow
def test_final_and_best_follow_a_real_trainer_job(trainer, prepared_dataset, dataprep_address, default_model,
                                                 recording_engine, tmp_path, caplog):
    run_dir = tmp_path / "run"
    published: list[pb.CheckpointEvent] = []
    evals: dict[int, float] = {}

    def on_event(response):
        if response.WhichOneof("event") == "checkpoint":
            published.append(response.checkpoint)
        elif response.WhichOneof("event") == "eval":
            evals[response.eval.step] = response.eval.eval_loss

    # 8 rows, 2 held out: 3 steps an epoch, 2 epochs; eval and a checkpoint every 2 steps
    job = client.wait(trainer.address, client.submit(trainer.address, TrainConfig(
        output_dir=str(run_dir), dataset=prepared_dataset, dataprep_address=dataprep_address, adapter_name="policy-ada",
        split_dataset_ratio=0.25, num_train_epochs=2, per_device_train_batch_size=2, eval_steps=2, save_steps=2,
        learning_rate=3e-3, lora_rank=8)), on_event=on_event)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert [(c.step, c.final) for c in published] == [(2, False), (4, False), (6, True)]
    # each checkpoint event carries the eval loss of its step, as logging.jsonl has it
    logged = {e["step"]: e["eval_loss"] for e in map(json.loads, (run_dir / "logging.jsonl").read_text().splitlines())
              if "eval_loss" in e}
    assert logged == evals and [c.eval_loss for c in published] == [logged[2], logged[4], logged[6]]
    running_min, promoted = float("inf"), []
    for c in published:
        if c.eval_loss < running_min:
            running_min = c.eval_loss
            promoted.append(c.step)

    async def follow(policy: FollowPolicy) -> list[str]:
        engine = recording_engine()
        registry = AdapterRegistry(engine, pathlib.Path(default_model), "base", max_lora_rank=16)
        follower = CheckpointFollower(trainer.address, registry, policy)
        follower.start()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            expected = str(run_dir / f"checkpoint-{promoted[-1] if policy.default == 'best' else 6}")
            while {v.name: v.path for v in registry.servable()}.get("policy-ada") != expected:
                assert asyncio.get_running_loop().time() < deadline, registry.list()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # nothing else arrives later
            return engine.paths()
        finally:
            await follower.stop()

    only_ours = parse_follow_jobs(["policy-*"])
    with caplog.at_level(logging.INFO, logger="tuneforge.serving.follow"):
        assert asyncio.run(follow(FollowPolicy("final", only_ours))) == [str(run_dir / "checkpoint-6")]
        refused = [(r.fields["step"], r.fields["reason"]) for r in caplog.records
                   if r.getMessage() == "published checkpoint not promoted" and r.fields["adapter"] == "policy-ada"]
        assert refused == [(2, "not the job's final checkpoint"), (4, "not the job's final checkpoint")]
        caplog.clear()
        assert asyncio.run(follow(FollowPolicy("best", only_ours))) == [str(run_dir / f"checkpoint-{promoted[-1]}")]
        refused = [r.fields["step"] for r in caplog.records
                   if r.getMessage() == "published checkpoint not promoted" and r.fields["adapter"] == "policy-ada"]
        assert refused == [c.step for c in published if c.step not in promoted]
        caplog.clear()
        assert asyncio.run(follow_nothing(trainer.address, recording_engine, default_model, caplog)) == []


async def follow_nothing(address, recording_engine, default_model, caplog) -> list[str]:
    """With patterns that match none of the published adapters, all three are seen and none loaded."""
    engine = recording_engine()
    registry = AdapterRegistry(engine, pathlib.Path(default_model), "base", max_lora_rank=16)
    follower = CheckpointFollower(address, registry, FollowPolicy("all", parse_follow_jobs(["prod-*"])))
    follower.start()
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len([r for r in caplog.records if getattr(r, "fields", {}).get("reason") ==
                   "no --follow_jobs pattern matches its adapter name"]) < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        return engine.paths()
    finally:
        await follower.stop()


def test_the_follower_reaches_a_trainer_over_mutual_tls(tls_files, monkeypatch, publish_adapter, recording_engine,
                                                        tmp_path):
    """The follower's channel comes from the shared factory: --tls_ca and the client
    certificate (here through their environment) reach a trainer that requires mutual TLS."""
    import time

    from libs.common import channels, tls
    from libs.common.server import create_server
    from protos.tuneforge.trainer.v1 import trainer_pb2_grpc

    (tmp_path / "base").mkdir()
    path = publish_adapter(tmp_path / "run" / "checkpoint-3", tmp_path / "base")

    class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
        def WatchCheckpoints(self, request, context):
            yield pb.WatchCheckpointsResponse(checkpoint=pb.CheckpointEvent(
                job_id="j", step=3, path=str(path), adapter_name="tls-ada", final=True))
            while context.is_active():
                time.sleep(0.05)

    def register(server):
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(Trainer(), server)
        return [pb.DESCRIPTOR.services_by_name["TrainerService"].full_name]

    server, port, _ = create_server("127.0.0.1:0", register, "tlsfollow",
                                    tls_config=tls.ServerTLS(tls_files.server_cert, tls_files.server_key, tls_files.ca))
    monkeypatch.setenv(channels.ENV_CA, tls_files.ca)
    monkeypatch.setenv(channels.ENV_CERT, tls_files.client_cert)
    monkeypatch.setenv(channels.ENV_KEY, tls_files.client_key)

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, tmp_path / "base", "base", max_lora_rank=16)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry)
        follower.start()
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not engine.paths():
                assert asyncio.get_running_loop().time() < deadline, "nothing loaded over TLS"
                await asyncio.sleep(0.05)
            return engine.paths()
        finally:
            await follower.stop()

    try:
        assert asyncio.run(scenario()) == [str(path)]
    finally:
        server.stop(0)
