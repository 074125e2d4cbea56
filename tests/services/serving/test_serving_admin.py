"""The admin gRPC AdapterService of the running serving process with real PEFT
adapters: load -> READY -> servable through the openai client with an answer of
its own; refusals with their status codes; swap to a newer checkpoint; unload;
health watchers and reflection streams that never starve the admin RPCs."""

from __future__ import annotations

import queue
import shutil
import time
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.config import DeployConfig

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "who are you?"}]


@pytest.fixture(scope="module")
def admin(serving):
    with grpc.insecure_channel(serving.grpc) as channel:
        yield serving_pb2_grpc.AdapterServiceStub(channel)


@pytest.fixture(scope="module")
def client(serving) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)


def greedy(client, model: str) -> str:
    return client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=16,
                                          ).choices[0].message.content


def listed(admin) -> dict[str, serving_pb2.Adapter]:
    return {a.name: a for a in admin.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}


def test_loaded_adapter_is_ready_listed_and_answers_differently(admin, client, serving, make_lora):
    path = make_lora("ada", rank=8, seed=1)
    started = time.perf_counter()
    reply = admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="ada", path=str(path)), timeout=60)
    answer = greedy(client, "ada")
    load_to_first_answer = time.perf_counter() - started
    print(f"LoadAdapter -> first answer: {load_to_first_answer:.3f} s (engine load {reply.adapter.load_seconds:.4f} s)")

    assert reply.adapter.state == serving_pb2.ADAPTER_STATE_READY
    assert reply.adapter.rank == 8
    assert reply.adapter.path == str(path)
    assert reply.adapter.base_model == str(serving.model_dir.resolve())
    assert reply.adapter.load_seconds > 0
    assert listed(admin)["ada"].state == serving_pb2.ADAPTER_STATE_READY
    cards = {m.id: m for m in client.models.list().data}
    assert cards["ada"].parent == serving.base_name
    assert cards["ada"].root == str(path)
    assert answer != greedy(client, serving.base_name)
    assert answer == greedy(client, "ada")  # greedy on the adapter is stable, not noise


def transformers_greedy(model_dir, adapter=None, max_new_tokens: int = 16) -> str:
    """The reference: Hugging Face transformers on the same chat template, with the
    adapter merged into the weights by PEFT."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    # Cut at max_new_tokens inside a multi-byte character, transformers decodes the dangling bytes
    # as U+FFFD; vLLM's incremental detokenizer holds them back until the character completes, so
    # its text (and `vllm serve`'s) ends before them. Seen with random adapters: '...can many you\ufffd'.
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).removesuffix("\ufffd")


def test_answers_match_transformers_with_the_adapter_merged(admin, client, serving, make_lora):
    path = make_lora("ada", rank=8, seed=1)
    admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="ada", path=str(path)), timeout=60)
    assert greedy(client, serving.base_name) == transformers_greedy(serving.model_dir)
    assert greedy(client, "ada") == transformers_greedy(serving.model_dir, path)


def test_reload_swaps_to_the_newer_checkpoint_and_unload_removes(admin, client, serving, make_lora):
    first = make_lora("swap", rank=8, seed=11, step=10)
    second = make_lora("swap", rank=8, seed=12, step=20)
    admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="swap", path=str(first)), timeout=60)
    old_answer = greedy(client, "swap")
    # The run directory resolves to its newest checkpoint, as ms-swift's --adapters does.
    reply = admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="swap", path=str(second.parent)), timeout=60)
    assert reply.adapter.path == str(second)
    new_answer = greedy(client, "swap")
    assert new_answer != old_answer
    assert [m.id for m in client.models.list().data].count("swap") == 1

    gone = admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="swap"), timeout=10)
    assert gone.adapter.path == str(second)
    assert "swap" not in listed(admin)
    assert "swap" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        greedy(client, "swap")
    with pytest.raises(grpc.RpcError) as info:
        admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="swap"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _refused(admin, name: str, path) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name=name, path=str(path)), timeout=60)
    return info.value


def test_tampered_checkpoint_is_refused(admin, make_lora, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(make_lora("ada", rank=8, seed=1), tampered)
    with open(tampered / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    error = _refused(admin, "tampered", tampered)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "adapter_model.safetensors" in error.details() and "sha256" in error.details()
    assert "tampered" not in listed(admin)


def test_rank_above_max_lora_rank_is_refused(admin, make_lora):
    error = _refused(admin, "wide", make_lora("wide", rank=32, seed=3))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rank 32" in error.details() and "max_lora_rank" in error.details()


def test_modules_to_save_is_refused(admin, make_lora):
    error = _refused(admin, "headed", make_lora("headed", rank=8, seed=4, modules_to_save=["lm_head"]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "modules_to_save" in error.details()


def test_other_base_model_is_refused(admin, make_lora, tmp_path):
    error = _refused(admin, "foreign", make_lora("foreign", rank=8, seed=5, record_base=str(tmp_path)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "trained on" in error.details()


def test_missing_path_and_bad_name_are_refused(admin, make_lora, serving, tmp_path):
    assert _refused(admin, "ghost", tmp_path / "nowhere").code() == grpc.StatusCode.NOT_FOUND
    assert _refused(admin, "empty-dir", tmp_path).code() == grpc.StatusCode.NOT_FOUND
    good = make_lora("ada", rank=8, seed=1)
    assert _refused(admin, "has space", good).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(admin, "", good).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _refused(admin, serving.base_name, good).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_watchers_and_reflection_streams_leave_the_admin_rpcs_answering(admin, serving):
    """64 Health/Watch watchers take no thread; reflection streams take at most
    --grpc_max_streams (8 by default) and the next is refused naming the flag; ListAdapters and
    Health/Check answer meanwhile."""
    limit = DeployConfig().grpc_max_streams
    channels, calls, requests = [], [], []
    try:
        for _ in range(64):
            channels.append(grpc.insecure_channel(serving.grpc))
            calls.append(health_pb2_grpc.HealthStub(channels[-1]).Watch(health_pb2.HealthCheckRequest(service="")))
            assert next(calls[-1]).status == health_pb2.HealthCheckResponse.SERVING
        for i in range(limit + 1):
            requests.append(queue.Queue())
            channels.append(grpc.insecure_channel(serving.grpc))
            reflection = reflection_pb2_grpc.ServerReflectionStub(channels[-1]).ServerReflectionInfo(
                iter(requests[-1].get, None), timeout=60)
            calls.append(reflection)
            requests[-1].put(reflection_pb2.ServerReflectionRequest(list_services=""))
            if i < limit:  # answered: the stream is running and now waits for its next request
                assert "tuneforge.serving.v1.AdapterService" in {
                    s.name for s in next(reflection).list_services_response.service}
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    next(reflection)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert caught.value.details() == (
                    f"ServerReflectionInfo: all {limit} stream slots of this serving server are taken "
                    f"(--grpc_max_streams {limit}); retry when a stream ends, or run the server with a larger "
                    "--grpc_max_streams")
        started = time.perf_counter()
        with grpc.insecure_channel(serving.grpc) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10
                                                             ).status == health_pb2.HealthCheckResponse.SERVING
        listed(admin)
        answered = time.perf_counter() - started
        print(f"under 64 Health/Watch + {limit} reflection streams: Check + ListAdapters in {answered * 1e3:.1f} ms")
        assert answered < 2
        with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
            page = response.read().decode()
        assert f'tuneforge_serving_grpc_streams_open{{method="ServerReflectionInfo"}} {float(limit)}' in page
        assert f"tuneforge_serving_grpc_streams_limit {float(limit)}" in page
        assert 'method="Watch"' not in page  # Health/Watch is neither wrapped nor counted
    finally:
        for pending in requests:
            pending.put(None)
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
