"""The admin gRPC AdapterService of the running serving process with real PEFT
adapters: load -> READY -> servable through the openai client with an answer of
its own; refusals with their status codes; swap to a newer checkpoint; unload."""

from __future__ import annotations

import shutil
import time

import grpc
import openai
import pytest

from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc

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
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


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
