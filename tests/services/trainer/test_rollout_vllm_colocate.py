"""The colocated vLLM generator (--vllm_mode colocate) with ONE in-process engine for the
module (LoRA enabled, rank 8, the default model): seeded generations reproduce and do not
depend on the batch around them; after a LoRA sync (as an adapter, and merged into the weights),
and after a full-weight sync, the engine's greedy tokens are exactly Hugging Face's for the
synced policy; the trainer's RNG streams and
torch thread control survive the engine's start; bad inputs are refused by name."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest
import torch

from libs.common.errors import FailedPrecondition, InvalidArgument
from services.trainer.rollout.base import Completion, Sampling

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [9, 10, 11], [300, 301, 302, 303, 304, 305, 306]]
EOS = (2, 0)  # the default model's generation_config eos_token_id
GREEDY = Sampling(n=1, max_tokens=8, temperature=0.0, stop_token_ids=EOS)
SAMPLED = Sampling(n=3, max_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=EOS)


@pytest.fixture(scope="module")
def engine(default_model):
    from services.trainer.rollout.vllm_colocate import ColocateGenerator

    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    set_num_threads = torch.set_num_threads
    environ = dict(os.environ)
    generator = ColocateGenerator(default_model, lora_rank=8, max_model_len=64, seed=0)
    generator.kept = (state, set_num_threads)
    print(f"colocated engine start: {generator.started_seconds:.2f} s")
    yield generator
    generator.close()
    # Nothing of the engine outlives it: the process group vLLM set up in process is gone, and
    # the environment it wrote (LD_PRELOAD, LOCAL_WORLD_SIZE, ...) is as before.
    assert not torch.distributed.is_initialized()
    written = ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_DIST_IDENT", "VLLM_WORKER_MULTIPROC_METHOD",
               "VLLM_ENABLE_V1_MULTIPROCESSING")
    assert {key: os.environ.get(key) for key in written} == {key: environ.get(key) for key in written}


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int = GREEDY.max_tokens) -> tuple[int, ...]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(EOS), pad_token_id=0)
    return tuple(out[0, len(prompt):].tolist())


def peft_policy(model_dir, seed: int):
    """A LoRA policy (r 8, all linear layers) whose B matrices are random, as after training."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(hf_model(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    perturb(policy, seed, only="lora_B", scale=0.5)
    return policy


def perturb(model: torch.nn.Module, seed: int, only: str = "", scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def test_a_configuration_vllm_refuses_is_a_failed_precondition_leaving_nothing(default_model):
    # Before the module's engine starts (this file's order): a refused start tears down what it set up.
    from services.trainer.rollout.vllm_colocate import ColocateGenerator

    environ = dict(os.environ)
    with pytest.raises(FailedPrecondition) as refused:
        ColocateGenerator(default_model, lora_rank=8, max_model_len=100_000, seed=0)
    assert refused.value.field == "vllm_mode"
    assert refused.value.message.startswith("vLLM refused the colocated engine's configuration: ")
    assert "max_model_len" in refused.value.message
    assert not torch.distributed.is_initialized()
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")


def test_the_trainers_rng_and_thread_control_survive_the_engine_start(engine):
    (torch_state, python_state, numpy_state), set_num_threads = engine.kept
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert torch.set_num_threads is set_num_threads
    assert not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1


def test_seeded_generations_reproduce_and_do_not_depend_on_the_batch(engine):
    first = engine.generate(PROMPTS, [11, 12, 13], SAMPLED)
    assert [len(group) for group in first] == [3, 3, 3]
    assert engine.generate(PROMPTS, [11, 12, 13], SAMPLED) == first
    # A prompt's completions depend on its own seed only: alone, or in another batch order.
    assert engine.generate([PROMPTS[1]], [12], SAMPLED) == [first[1]]
    assert engine.generate([PROMPTS[2], PROMPTS[0]], [13, 11], SAMPLED) == [first[2], first[0]]
    # The n completions of a prompt differ from each other, and another seed draws others.
    assert len({c.token_ids for c in first[0]}) == 3
    assert engine.generate([PROMPTS[0]], [99], SAMPLED) != [first[0]]
    for group in first:
        for completion in group:
            assert isinstance(completion, Completion)
            assert 1 <= len(completion.token_ids) <= SAMPLED.max_tokens
            # finished <=> the last token is a stop token (which is kept); else max_tokens were drawn
            assert completion.finished == (completion.token_ids[-1] in EOS)
            if not completion.finished:
                assert len(completion.token_ids) == SAMPLED.max_tokens
    assert any(c.finished for g in first for c in g) and any(not c.finished for g in first for c in g)


def test_lora_sync_generates_as_each_adapter_version(engine, default_model):
    base = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
    assert base == [hf_greedy(hf_model(default_model), p) for p in PROMPTS]
    # top_k reaches the sampler: k 1 at temperature 1 is greedy.
    top1 = Sampling(n=2, max_tokens=GREEDY.max_tokens, temperature=1.0, top_k=1, stop_token_ids=EOS)
    assert [[c.token_ids for c in g] for g in engine.generate(PROMPTS, [5, 6, 7], top1)] == [[t, t] for t in base]

    policy = peft_policy(default_model, seed=1)
    started = time.perf_counter()
    engine.sync(policy, step=1)
    print(f"LoRA r8 sync: {engine.sync_seconds:.3f} s ({time.perf_counter() - started:.3f} s wall)")
    first = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
    assert first == [hf_greedy(policy, p) for p in PROMPTS]
    assert first != base

    perturb(policy, seed=2, only="lora_B", scale=0.5)  # the next version of the same adapter
    engine.sync(policy, step=2)
    second = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
    assert second == [hf_greedy(policy, p) for p in PROMPTS]
    assert second != first
    assert engine.llm.llm_engine.list_loras() == {engine._lora.lora_int_id}  # the previous version is gone


def test_serving_merged_single_lora_path_generates_as_vllms_lora_ops(engine, default_model):
    """libs.common.vllm_cpu_lora's merged path (serving's --lora_merge_single), in this engine:
    a batch on the policy's one slot generates what vLLM's LoRA ops do, and after the next
    version is loaded into the same slot (max_loras 1) it follows that version."""
    from libs.common import vllm_cpu_lora

    policy = peft_policy(default_model, seed=7)
    engine.sync(policy, step=7)
    try:
        vllm_ops = [g[0].token_ids for g in engine.generate(PROMPTS, [0, 0, 0], GREEDY)]
        vllm_cpu_lora.merge_single(True)
        merged = [g[0].token_ids for g in engine.generate(PROMPTS, [0, 0, 0], GREEDY)]
        assert len(vllm_cpu_lora._CACHED) == 8  # 2 layers x qkv, o, gate_up, down ran merged
        perturb(policy, seed=8, only="lora_B", scale=0.5)
        engine.sync(policy, step=8)
        merged_next = [g[0].token_ids for g in engine.generate(PROMPTS, [0, 0, 0], GREEDY)]
        vllm_cpu_lora.merge_single(False)
        vllm_ops_next = [g[0].token_ids for g in engine.generate(PROMPTS, [0, 0, 0], GREEDY)]
    finally:
        vllm_cpu_lora.merge_single(False)
    assert merged == vllm_ops
    assert merged_next == vllm_ops_next == [hf_greedy(policy, p) for p in PROMPTS]
    assert merged_next != merged
    assert merged != [hf_greedy(hf_model(default_model), p) for p in PROMPTS]


def test_merged_lora_sync_generates_as_the_policy_and_leaves_it_untouched(engine, default_model):
    # --vllm_enable_lora false (colocate's default for lora): the base weights plus the adapter's delta
    # loaded in place; the adapter the previous test left is dropped with it.
    policy = peft_policy(default_model, seed=4)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    engine.merge_lora = True
    try:
        engine.sync(policy, step=5)
        print(f"merged LoRA r8 sync: {engine.sync_seconds:.3f} s")
        got = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
        assert engine.llm.llm_engine.list_loras() == set()
        assert got == [hf_greedy(policy, p) for p in PROMPTS]
        assert got != [hf_greedy(hf_model(default_model), p) for p in PROMPTS]
        perturb(policy, seed=5, only="lora_B", scale=0.5)  # the next version
        moved = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
        engine.sync(policy, step=6)
        again = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
        assert again == [hf_greedy(policy, p) for p in PROMPTS] and again != got
    finally:
        engine.merge_lora = False
    # merged out of place: not a bit of the policy moved (PEFT's merge/unmerge would round the base)
    after = policy.state_dict()
    assert all(torch.equal(after[name], moved[name]) for name in moved)
    assert all(torch.equal(after[name], before[name]) for name in before if "lora_B" not in name)


def test_full_weight_sync_loads_in_place_and_generates_as_the_updated_model(engine, default_model):
    model = hf_model(default_model)
    perturb(model, seed=3)
    started = time.perf_counter()
    engine.sync(model, step=3)
    print(f"full-weight sync: {engine.sync_seconds:.3f} s ({time.perf_counter() - started:.3f} s wall)")
    got = [engine.generate([p], [0], GREEDY)[0][0].token_ids for p in PROMPTS]
    assert got == [hf_greedy(model, p) for p in PROMPTS]
    assert got != [hf_greedy(hf_model(default_model), p) for p in PROMPTS]
    assert engine.llm.llm_engine.list_loras() == set()  # the full policy carries everything


def test_bad_inputs_are_refused_by_name(engine, default_model):
    with pytest.raises(InvalidArgument) as mismatch:
        engine.generate(PROMPTS, [1, 2], GREEDY)
    assert mismatch.value.field == "seeds" and "3 prompts but 2 seeds" in mismatch.value.message
    with pytest.raises(InvalidArgument) as too_long:
        engine.generate([list(range(3, 60))], [1], GREEDY)
    assert too_long.value.field == "max_completion_length"
    assert "57 tokens plus --max_completion_length 8 exceeds the engine's max_model_len 64" in too_long.value.message

    from peft import LoraConfig, get_peft_model

    wide = get_peft_model(hf_model(default_model), LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with pytest.raises(FailedPrecondition) as rank:
        engine.sync(wide, step=4)
    assert "LoRA rank 16 is above the engine's slot rank 8" in rank.value.message
