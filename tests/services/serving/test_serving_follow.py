"""The checkpoint follower against a real gRPC TrainerService on 127.0.0.1 that
publishes checkpoints, with --follow_policy all (the promotion policies are
test_serving_follow_policy.py's): each one is loaded under its adapter name (replacing the
older one), a checkpoint that vanished is skipped without stopping the follower,
and the follower reconnects when the trainer comes (back) up. The registry's engine records loads (conftest's recording_engine)."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest
from prometheus_client import REGISTRY

from libs.common.errors import FailedPrecondition
from protos.tuneforge.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from services.serving.adapters import AdapterRegistry
from services.serving.follow import CheckpointFollower, FollowPolicy


class Trainer(trainer_pb2_grpc.TrainerServiceServicer):
    """WatchCheckpoints as the trainer promises it: replay what was published, then live ones."""

    def __init__(self):
        self.published: list[trainer_pb2.CheckpointEvent] = []
        self.changed = asyncio.Condition()

    async def publish(self, **fields) -> None:
        async with self.changed:
            self.published.append(trainer_pb2.CheckpointEvent(**fields))
            self.changed.notify_all()

    async def WatchCheckpoints(self, request, context):
        sent = 0
        while True:
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.published) > sent)
                events = self.published[sent:]
            for event in events:
                yield trainer_pb2.WatchCheckpointsResponse(checkpoint=event)
            sent += len(events)


async def serve(trainer: Trainer, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def base(tmp_path):
    (tmp_path / "base").mkdir()
    return tmp_path / "base"


def served(registry: AdapterRegistry) -> dict[str, str]:
    return {view.name: view.path for view in registry.servable()}


def test_follows_publications_and_replaces_older_checkpoints(base, tmp_path, publish_adapter, recording_engine):
    run = tmp_path / "run"
    checkpoints = [publish_adapter(run / f"checkpoint-{step}", base, weights=bytes([step])) for step in (10, 20, 30)]
    other = publish_adapter(tmp_path / "other" / "checkpoint-5", base)
    stale = tmp_path / "gone" / "checkpoint-1"  # rotated away before serving saw it

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, base, "base", max_lora_rank=16)
        trainer = Trainer()
        # Published before serving connects: replayed, and the burst collapses to the newest.
        await trainer.publish(job_id="j1", step=10, path=str(checkpoints[0]), adapter_name="ada")
        await trainer.publish(job_id="j1", step=20, path=str(checkpoints[1]), adapter_name="ada")
        server, port = await serve(trainer)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry, FollowPolicy("all"))
        follower.start()
        try:
            await until(lambda: served(registry).get("ada") == str(checkpoints[1]))
            await trainer.publish(job_id="j2", step=1, path=str(stale), adapter_name="gone")
            await trainer.publish(job_id="j3", step=5, path=str(other), adapter_name="other")
            await trainer.publish(job_id="j1", step=30, path=str(checkpoints[2]), adapter_name="ada", final=True)
            await until(lambda: served(registry) == {"ada": str(checkpoints[2]), "other": str(other)})
            await asyncio.sleep(0)
            # Only what is served stays in the engine; the missing checkpoint was refused, not fatal.
            assert engine.paths() == sorted([str(checkpoints[2]), str(other)])
            assert str(checkpoints[0]) not in {lora.lora_path for lora in engine.loaded.values()}
        finally:
            await follower.stop()
            await server.stop(0)

    asyncio.run(scenario())


def test_checkpoints_without_an_adapter_name_are_left_alone(base, tmp_path, publish_adapter, recording_engine,
                                                           caplog):
    """A reward model's checkpoint (a LoRA with its score head trained whole) is published with
    no adapter name, as a full model's: the follower says so and loads it not, and takes the
    next checkpoint. Loaded by hand, the registry refuses it (vLLM serves LoRA deltas only)."""
    reward_model = publish_adapter(tmp_path / "rm" / "checkpoint-2", base, modules_to_save=["classifier", "score"])
    ada = publish_adapter(tmp_path / "ada" / "checkpoint-1", base)

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, base, "base", max_lora_rank=16)
        trainer = Trainer()
        await trainer.publish(job_id="rm", step=2, path=str(reward_model), adapter_name="", final=True)
        await trainer.publish(job_id="ada", step=1, path=str(ada), adapter_name="ada")
        server, port = await serve(trainer)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry, FollowPolicy("all"))
        follower.start()
        try:
            await until(lambda: served(registry).get("ada") == str(ada))
            assert engine.paths() == [str(ada)]
            with pytest.raises(FailedPrecondition, match="modules_to_save"):
                registry.validate("rm", reward_model)
        finally:
            await follower.stop()
            await server.stop(0)

    with caplog.at_level(logging.INFO, logger="tuneforge.serving.follow"):
        asyncio.run(scenario())
    skipped = [r for r in caplog.records if r.getMessage().startswith("checkpoint without an adapter name")]
    assert [r.fields["path"] for r in skipped] == [str(reward_model)]
    assert "(a full model or a reward model); not loaded" in skipped[0].getMessage()


def test_reconnects_when_the_trainer_comes_up_and_after_it_restarts(base, tmp_path, publish_adapter, recording_engine):
    first = publish_adapter(tmp_path / "run" / "checkpoint-1", base, weights=b"1")
    second = publish_adapter(tmp_path / "run" / "checkpoint-2", base, weights=b"2")
    port = free_port()

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, base, "base", max_lora_rank=16)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry, FollowPolicy("all"), initial_backoff=0.05,
                                      max_backoff=0.2,
                                      connect_timeout=0.2)
        follower.start()
        try:
            await asyncio.sleep(0.3)  # nobody listens yet: the follower keeps retrying
            trainer = Trainer()
            await trainer.publish(job_id="j", step=1, path=str(first), adapter_name="ada")
            server, _ = await serve(trainer, port)
            await until(lambda: served(registry).get("ada") == str(first))
            await server.stop(0)  # the trainer restarts, with one more checkpoint published meanwhile
            loads = engine.next_id
            restarted = Trainer()
            await restarted.publish(job_id="j", step=1, path=str(first), adapter_name="ada")
            await restarted.publish(job_id="j", step=2, path=str(second), adapter_name="ada")
            server, _ = await serve(restarted, port)
            await until(lambda: served(registry).get("ada") == str(second))
            # The replayed checkpoint-1 was already served: not loaded again.
            assert engine.next_id == loads + 1
            await server.stop(0)
        finally:
            await follower.stop()

    asyncio.run(scenario())


def test_delivery_is_observed_for_live_publications_only(base, tmp_path, publish_adapter, recording_engine):
    """A publication made while serving follows has its delivery (publication -> load) in the
    parts histogram; one replayed on connect (published while serving was away) has not: its
    wait says how long serving was away. Loads of both run their first request."""
    replayed = publish_adapter(tmp_path / "old" / "checkpoint-1", base)
    live = publish_adapter(tmp_path / "new" / "checkpoint-1", base)

    def deliveries() -> tuple[float, float]:
        labels = {"part": "delivery"}
        return (REGISTRY.get_sample_value("tuneforge_serving_adapter_load_part_seconds_count", labels),
                REGISTRY.get_sample_value("tuneforge_serving_adapter_load_part_seconds_sum", labels))

    def stamped(**fields) -> dict:
        event = trainer_pb2.CheckpointEvent(**fields)
        event.publish_time.GetCurrentTime()
        return {name: getattr(event, name) for name in fields} | {"publish_time": event.publish_time}

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, base, "base", max_lora_rank=16)
        trainer = Trainer()
        await trainer.publish(**stamped(job_id="j1", step=1, path=str(replayed), adapter_name="old"))
        server, port = await serve(trainer)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry, FollowPolicy("all"))
        before = deliveries()
        follower.start()
        try:
            await until(lambda: "old" in served(registry))
            assert deliveries() == before
            await trainer.publish(**stamped(job_id="j2", step=1, path=str(live), adapter_name="new"))
            await until(lambda: "new" in served(registry))
            count, total = deliveries()
            assert count == before[0] + 1
            assert 0 <= total - before[1] < 10
            assert engine.first_requests == ["old@1", "new@2"]
        finally:
            await follower.stop()
            await server.stop(0)

    asyncio.run(scenario())


def test_a_checkpoint_vllm_cannot_serve_says_why_and_how_to_serve_it_merged(base, tmp_path, publish_adapter,
                                                                             recording_engine):
    """The Chinese-LLaMA recipe's checkpoint (modules_to_save embed_tokens,lm_head on a vocabulary
    resized by --tokenizer) is not a LoRA vLLM can apply. One engine serves one base model, so its
    merged export needs a server of its own: the follower loads nothing, and the reason with the
    commands reaches ListAdapters (FAILED), a request naming it (404) and the refusals counter.
    A name already serving keeps serving its older checkpoint, with the reason as its error."""
    from safetensors.torch import save
    import torch

    from libs.common.errors import NotFound
    from services.serving.admin import to_proto
    from protos.tuneforge.serving.v1 import serving_pb2

    (base / "config.json").write_text('{"vocab_size": 8}')

    def whole(rows: int) -> bytes:  # PEFT's names for modules saved whole, and a LoRA pair
        return save({"base_model.model.model.embed_tokens.weight": torch.zeros(rows, 4),
                     "base_model.model.lm_head.weight": torch.zeros(rows, 4),
                     "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 4)})

    modules = ["embed_tokens", "lm_head"]
    resized = publish_adapter(tmp_path / "cn" / "checkpoint-3", base, weights=whole(12), modules_to_save=modules)
    ada = publish_adapter(tmp_path / "ada" / "checkpoint-1", base)
    ada_whole = publish_adapter(tmp_path / "ada" / "checkpoint-2", base, weights=whole(8), modules_to_save=modules)

    def refusals(reason: str) -> float:
        return REGISTRY.get_sample_value("tuneforge_serving_adapter_refusals_total", {"reason": reason})

    def why(path, resized_from: int | None = None) -> str:
        vocabulary = (f"its embed_tokens/lm_head have 12 rows, a vocabulary resized from this base's {resized_from} "
                      "tokens (--tokenizer), and " if resized_from else "")
        return (f"{path} is not served: {vocabulary}it sets modules_to_save (embed_tokens, lm_head), whole modules "
                "that vLLM cannot apply as LoRA deltas to the served base model. Serve it merged, as a model of "
                f"its own: tuneforge export --adapters {path} --merge_lora true --output_dir {path}-merged && "
                f"tuneforge deploy --model {path}-merged")

    async def scenario():
        engine = recording_engine()
        registry = AdapterRegistry(engine, base, "base", max_lora_rank=16)
        trainer = Trainer()
        await trainer.publish(job_id="cn", step=3, path=str(resized), adapter_name="cn", final=True)
        await trainer.publish(job_id="ada", step=1, path=str(ada), adapter_name="ada")
        server, port = await serve(trainer)
        follower = CheckpointFollower(f"127.0.0.1:{port}", registry, FollowPolicy("all"))
        before = refusals("resized_vocabulary"), refusals("modules_to_save")
        follower.start()
        try:
            await until(lambda: "ada" in served(registry) and "cn" in {v.name for v in registry.list()})
            shown = {view.name: to_proto(view) for view in registry.list()}
            assert (shown["cn"].state, shown["cn"].path, shown["cn"].error) == (
                serving_pb2.ADAPTER_STATE_FAILED, str(resized), why(resized, resized_from=8))
            with pytest.raises(NotFound) as info:
                registry.lease("cn")
            assert info.value.message == f"The model `cn` is not served: {why(resized, resized_from=8)}"
            assert (refusals("resized_vocabulary"), refusals("modules_to_save")) == (before[0] + 1, before[1])

            await trainer.publish(job_id="ada", step=2, path=str(ada_whole), adapter_name="ada")
            await until(lambda: any(v.name == "ada" and v.error for v in registry.list()))
            view = next(v for v in registry.list() if v.name == "ada")
            assert (view.state.value, view.path, view.error) == ("ready", str(ada), why(ada_whole))
            assert served(registry)["ada"] == str(ada)  # still serving its older checkpoint
            assert refusals("modules_to_save") == before[1] + 1
            assert engine.paths() == [str(ada)]  # nothing refused reached the engine
        finally:
            await follower.stop()
            await server.stop(0)

    asyncio.run(scenario())
