"""More adapters than the engine batches (--max_loras) and keeps in memory
(--max_cpu_loras): requests for them wait for a slot instead of failing, an
evicted adapter is read again from disk, and each answer is still its own
adapter's, even when its checkpoint was deleted meanwhile; base-model requests batched with adapter requests stay the base
model's (vLLM's CPU LoRA ops gave them an adapter). The session's serving
process runs with max_loras = max_cpu_loras = 4."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "who are you?"}]
ADAPTERS = 7  # over the session's --max_loras 4 and --max_cpu_loras 4


def test_more_adapters_than_max_loras_queue_and_answer_as_themselves(serving, make_lora):
    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=120)
    names = [f"cache{i}" for i in range(ADAPTERS)]
    with grpc.insecure_channel(serving.grpc) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)
        for i, name in enumerate(names):
            admin.LoadAdapter(serving_pb2.LoadAdapterRequest(
                name=name, path=str(make_lora(name, seed=100 + i))), timeout=60)
        try:
            def ask(model: str) -> str:
                return client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                                      max_tokens=12).choices[0].message.content

            # One at a time: each adapter's own answer (the LRU cache evicts and reloads as it goes).
            models = [serving.base_name, *names]
            alone = {model: ask(model) for model in models}
            assert len(set(alone.values())) == len(models), alone  # the base and seven adapters: eight answers
            # All at once, twice over: more adapters than fit in a batch, and the base model batched
            # with them; none fails, none is mixed up.
            with ThreadPoolExecutor(len(models) * 2) as pool:
                together = list(pool.map(ask, models * 2))
            assert together == [alone[model] for model in models * 2]
            # A checkpoint pruned from disk while its adapter is registered (and long evicted
            # from the engine's cache): the engine reads its own hold on the files, and lives.
            shutil.rmtree(make_lora("cache0", seed=100))
            assert [ask(name) for name in names[1:]] == [alone[name] for name in names[1:]]  # cache0 evicted
            assert ask("cache0") == alone["cache0"]
            assert ask(serving.base_name) == alone[serving.base_name]
            listed = {a.name for a in admin.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}
            assert set(names) <= listed  # the registry is not bounded by the engine's cache
        finally:
            for name in names:
                admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name=name), timeout=30)
