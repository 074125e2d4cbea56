"""Rollouts on the session's serving process (--vllm_mode server): RolloutService.Generate by
token ids (seeded per prompt: reproducible and independent of the batch; n completions; greedy
equal to Hugging Face's), a LoRA policy pushed by bytes under a job-scoped name, replaced by a
new version and used, through the trainer's ServerGenerator; bad requests refused with their
status codes and fields."""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from libs.common.errors import FailedPrecondition
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.trainer.rollout.base import Sampling
from services.trainer.rollout.vllm_server import ServerGenerator, adapter_files

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [9, 10, 11], [300, 301, 302, 303, 304, 305, 306]]
EOS = (2, 0)  # the default model's generation_config eos_token_id
GREEDY = Sampling(n=1, max_tokens=8, temperature=0.0, stop_token_ids=EOS)
SAMPLED = Sampling(n=3, max_tokens=12, temperature=1.0, top_p=0.95, stop_token_ids=EOS)


@pytest.fixture(scope="module")
def channel(serving):
    with grpc.insecure_channel(serving.grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def rollouts(channel):
    return serving_pb2_grpc.RolloutServiceStub(channel)


@pytest.fixture(scope="module")
def admin(channel):
    return serving_pb2_grpc.AdapterServiceStub(channel)


@pytest.fixture
def generator(serving, request):
    made = ServerGenerator(serving.grpc, job=f"job-{request.node.name[:40]}", base_model=serving.model_dir,
                           lora_rank=8)
    yield made
    made.close()


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def hf_greedy(model, prompt: list[int]) -> tuple[int, ...]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=list(EOS), pad_token_id=0)
    return tuple(out[0, len(prompt):].tolist())


def perturb_lora(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def peft_policy(model_dir, seed: int, rank: int = 8):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(hf_model(model_dir), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    perturb_lora(policy, seed)
    return policy


def listed(admin) -> dict[str, serving_pb2.Adapter]:
    return {a.name: a for a in admin.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}


def test_generate_by_token_ids_is_seeded_per_prompt_with_n_completions(generator, serving):
    started = time.perf_counter()
    first = generator.generate(PROMPTS, [11, 12, 13], SAMPLED)
    print(f"server generate, 3 prompts x n 3 x <= 12 tokens, base: {time.perf_counter() - started:.3f} s")
    assert [len(group) for group in first] == [3, 3, 3]
    assert generator.generate(PROMPTS, [11, 12, 13], SAMPLED) == first
    assert generator.generate([PROMPTS[1]], [12], SAMPLED) == [first[1]]
    assert generator.generate([PROMPTS[2], PROMPTS[0]], [13, 11], SAMPLED) == [first[2], first[0]]
    assert len({c.token_ids for c in first[0]}) == 3
    assert generator.generate([PROMPTS[0]], [99], SAMPLED) != [first[0]]
    for group in first:
        for completion in group:
            assert completion.finished == (completion.token_ids[-1] in EOS)
            assert completion.finished or len(completion.token_ids) == SAMPLED.max_tokens
    # Greedy on the base model is Hugging Face's greedy, token for token.
    base = hf_model(serving.model_dir)
    greedy = [g[0].token_ids for g in generator.generate(PROMPTS, [0, 0, 0], GREEDY)]
    assert greedy == [hf_greedy(base, p) for p in PROMPTS]
    # top_k reaches the sampler: k 1 at temperature 1 is greedy; 0 (transformers' "off") is accepted.
    top1 = Sampling(n=2, max_tokens=GREEDY.max_tokens, temperature=1.0, top_k=1, stop_token_ids=EOS)
    assert [[c.token_ids for c in g] for g in generator.generate(PROMPTS, [5, 6, 7], top1)] == [[t, t] for t in greedy]
    assert len(generator.generate(PROMPTS, [5, 6, 7], Sampling(n=2, max_tokens=4, temperature=1.0, top_k=0))) == 3


def test_a_pushed_lora_is_replaced_by_its_next_version_and_used(generator, serving, admin):
    base = [g[0].token_ids for g in generator.generate(PROMPTS, [0, 0, 0], GREEDY)]
    policy = peft_policy(serving.model_dir, seed=1)
    generator.sync(policy, step=1)
    print(f"server LoRA r8 sync (save + push + load): {generator.sync_seconds:.3f} s")
    first = [g[0].token_ids for g in generator.generate(PROMPTS, [0, 0, 0], GREEDY)]
    assert first == [hf_greedy(policy, p) for p in PROMPTS]
    assert first != base
    served = listed(admin)[generator.job]
    assert served.state == serving_pb2.ADAPTER_STATE_READY and served.rank == 8

    perturb_lora(policy, seed=2)
    generator.sync(policy, step=2)
    second = [g[0].token_ids for g in generator.generate(PROMPTS, [0, 0, 0], GREEDY)]
    assert second == [hf_greedy(policy, p) for p in PROMPTS]
    assert second != first
    replaced = listed(admin)[generator.job]
    assert replaced.path != served.path  # the engine's own copy of the new version's files

    generator.close()
    assert generator.job not in listed(admin)


def test_a_full_policy_is_refused_in_server_mode_naming_the_flag(serving):
    with pytest.raises(FailedPrecondition) as refused:
        ServerGenerator(serving.grpc, job="full", base_model=serving.model_dir, lora_rank=None)
    assert refused.value.field == "vllm_mode" and "--vllm_mode colocate" in refused.value.message
    made = ServerGenerator(serving.grpc, job="lora-then-full", base_model=serving.model_dir, lora_rank=8)
    try:
        with pytest.raises(FailedPrecondition) as full:
            made.sync(hf_model(serving.model_dir), step=1)
        assert "--vllm_mode server syncs a LoRA policy only" in full.value.message
    finally:
        made.close()


def request(model: str = "", prompts=((5, 6, 7),), **sampling) -> serving_pb2.GenerateRequest:
    sampling = {"n": 1, "max_tokens": 4, "temperature": 0.0, **sampling}
    return serving_pb2.GenerateRequest(model=model, prompts=[serving_pb2.RolloutPrompt(token_ids=list(p))
                                                             for p in prompts],
                                       sampling=serving_pb2.RolloutSampling(**sampling))


@pytest.mark.parametrize("bad, code, details", [
    (request(prompts=()), grpc.StatusCode.INVALID_ARGUMENT, "prompts: give at least one prompt"),
    (request(prompts=((5, 6), ())), grpc.StatusCode.INVALID_ARGUMENT, "prompts[1].token_ids: must not be empty"),
    (request(prompts=((5, 3072),)), grpc.StatusCode.INVALID_ARGUMENT,
     "prompts[0].token_ids: token id 3072 is outside the vocabulary [0, 3072)"),
    (request(prompts=((5,) * 2046,), max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens: This model's maximum context length is 2048 tokens. However, you requested 2050 tokens"),
    (request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.max_tokens: must be at least 1; got 0"),
    (request(n=-2), grpc.StatusCode.INVALID_ARGUMENT, "sampling.n: must be at least 1; got -2"),
    (request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature: must be a number of at least 0; got -0.5"),
    (request(temperature=float("nan")), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.temperature: must be a number of at least 0; got nan"),
    (request(n=2000, prompts=((5, 6),) * 3), grpc.StatusCode.RESOURCE_EXHAUSTED,
     "prompts: 3 prompts x n 2000 = 6000 sequences, above 4096 per call: split the rollout"),
    (request(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: must be in (0, 1]; got 0.0"),
    (request(top_k=-2), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.top_k: must be -1 or 0 (off), or at least 1; got -2"),
    (request(stop_token_ids=[9999]), grpc.StatusCode.INVALID_ARGUMENT,
     "sampling.stop_token_ids: token id 9999 is outside the vocabulary"),
    (request(model="no-such-adapter"), grpc.StatusCode.NOT_FOUND, "model: The model `no-such-adapter` does not exist."),
])
def test_bad_generate_requests_get_their_status_and_field(rollouts, bad, code, details):
    with pytest.raises(grpc.RpcError) as refused:
        rollouts.Generate(bad, timeout=30)
    assert refused.value.code() == code
    assert refused.value.details().startswith(details), refused.value.details()


def test_a_seed_whose_completions_overflow_64_bits_is_refused(rollouts):
    bad = request(n=2, temperature=1.0)
    bad.prompts[0].seed = 2**64 - 1
    with pytest.raises(grpc.RpcError) as refused:
        rollouts.Generate(bad, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"prompts.seed: seed {2**64 - 1} + n - 1 is above {2**64 - 1}"


def test_bad_pushes_get_their_status_and_field(admin, serving, tmp_path):
    good = adapter_files(peft_policy(serving.model_dir, seed=3), str(serving.model_dir))

    def push(name: str, files: dict[str, bytes]):
        with pytest.raises(grpc.RpcError) as refused:
            admin.PushAdapter(serving_pb2.PushAdapterRequest(
                name=name, files=[serving_pb2.AdapterFile(name=k, content=v) for k, v in files.items()]), timeout=60)
        return refused.value.code(), refused.value.details()

    assert push("job-x", {**good, "../evil.json": b"{}"}) == (
        grpc.StatusCode.INVALID_ARGUMENT, "files: '../evil.json' is not a file of a PEFT adapter; expected some of "
        "adapter_config.json, adapter_model.safetensors, adapter_model.bin, args.json, README.md")
    assert push("job-x", {"adapter_model.safetensors": good["adapter_model.safetensors"]}) == (
        grpc.StatusCode.INVALID_ARGUMENT, "files: no adapter_config.json among the files")
    assert push("bad name", good)[0] == grpc.StatusCode.INVALID_ARGUMENT
    other_base = {**good, "args.json": json.dumps({"model": str(tmp_path)}).encode()}
    code, details = push("job-x", other_base)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert f"was trained on {tmp_path}, but this server serves {serving.model_dir.resolve()}" in details
    wide = adapter_files(peft_policy(serving.model_dir, seed=3, rank=32), str(serving.model_dir))
    code, details = push("job-x", wide)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "has LoRA rank 32, above this server's --max_lora_rank 16" in details
    assert "job-x" not in listed(admin)


# -- fuzzed over real gRPC (tests/grpc_fuzz.py): proper codes naming the field, the engine unharmed ----


def test_generate_fuzz(rollouts, serving):
    from hypothesis import given, settings, strategies as st

    from tests.grpc_fuzz import assert_serving, check, messages, reached, unary

    valid_ids = st.lists(st.integers(0, 3071), min_size=1, max_size=8)
    token_ids = st.one_of(valid_ids, valid_ids, valid_ids, st.lists(st.sampled_from([-1, 3072, 2**31 - 1, -2**31]),
                                                                    max_size=2))
    prompts = st.lists(messages(serving_pb2.RolloutPrompt, only={"RolloutPrompt.token_ids": token_ids}), max_size=4)
    # Bounded work per example: small n and max_tokens, besides the values that must be refused;
    # valid values more often than not, so that requests get past validation to the engine.
    sampling = messages(serving_pb2.RolloutSampling, only={
        "RolloutSampling.n": st.sampled_from([1, 2, 3, 0, -1, 2**31 - 1]),
        "RolloutSampling.max_tokens": st.sampled_from([1, 4, 8, 0, -5, 3000, 2**31 - 1]),
        "RolloutSampling.temperature": st.sampled_from([0.0, 0.7, 1.0, 1e-4, 5e-324, 1e308, -1.0, float("nan"),
                                                        float("inf")]),
        "RolloutSampling.top_p": st.sampled_from([0.9, 1.0, 5e-324, 0.0, 1.5, float("nan")]),
        "RolloutSampling.top_k": st.sampled_from([-1, 0, 5, 1, 2**31 - 1, -2, -2**31]),
        "RolloutSampling.stop_token_ids": st.lists(st.sampled_from([0, 2, 16, -1, 3072]), max_size=2)})
    requests = messages(serving_pb2.GenerateRequest, only={
        "GenerateRequest.model": st.sampled_from(["", serving.base_name, "no-such-adapter", "\x00"]),
        "GenerateRequest.prompts": prompts, "GenerateRequest.sampling": sampling})
    # Half the examples valid in every field, so that the engine sees many (seeds of every size).
    valid = messages(serving_pb2.GenerateRequest, only={
        "GenerateRequest.model": st.sampled_from(["", serving.base_name]),
        "GenerateRequest.prompts": st.lists(messages(serving_pb2.RolloutPrompt, only={
            "RolloutPrompt.token_ids": valid_ids, "RolloutPrompt.seed": st.integers(0, 2**64 - 4)}),
            min_size=1, max_size=4),
        "GenerateRequest.sampling": messages(serving_pb2.RolloutSampling, only={
            "RolloutSampling.n": st.sampled_from([1, 2, 3]), "RolloutSampling.max_tokens": st.sampled_from([1, 4, 8]),
            "RolloutSampling.temperature": st.sampled_from([0.0, 0.7, 1.0, 1e-4, 5e-324, 1e308]),
            "RolloutSampling.top_p": st.sampled_from([0.9, 1.0, 5e-324]),
            "RolloutSampling.top_k": st.sampled_from([-1, 0, 5, 1, 2**31 - 1]),
            "RolloutSampling.stop_token_ids": st.lists(st.sampled_from([0, 2, 16]), max_size=2)})})

    @settings(max_examples=settings().max_examples // 2)
    @given(request=st.one_of(valid, requests))
    def fuzz(request):
        check(unary(rollouts.Generate, request, timeout=60), request)

    fuzz()
    assert {"OK", "INVALID_ARGUMENT"} <= set(reached(serving_pb2.GenerateRequest))
    assert_serving(serving.grpc, ["tuneforge.serving.v1.RolloutService"])
    assert len(rollouts.Generate(request(max_tokens=4), timeout=30).results[0].completions[0].token_ids) >= 1


def test_push_adapter_fuzz(admin, serving):
    from hypothesis import given, settings, strategies as st

    from tests.grpc_fuzz import assert_serving, check, messages, reached, unary

    good = adapter_files(peft_policy(serving.model_dir, seed=4), str(serving.model_dir))
    names = st.sampled_from([*good, "manifest.json", "../adapter_config.json", "", "a/b", "\x00"])
    contents = st.sampled_from([*good.values(), b"", b"{", b"[]", b"\x00" * 16])
    files = st.one_of(st.just([serving_pb2.AdapterFile(name=k, content=v) for k, v in good.items()]),
                      st.lists(messages(serving_pb2.AdapterFile, only={"AdapterFile.name": names,
                                                                        "AdapterFile.content": contents}), max_size=5))
    pushes = messages(serving_pb2.PushAdapterRequest, only={
        "PushAdapterRequest.name": st.sampled_from(["fuzz-push", "fuzz-push-2", "", "has space", serving.base_name]),
        "PushAdapterRequest.files": files})

    @settings(max_examples=settings().max_examples // 4)
    @given(push=pushes)
    def fuzz(push):
        check(unary(admin.PushAdapter, push, timeout=120), push)

    fuzz()
    assert {"OK", "INVALID_ARGUMENT"} <= set(reached(serving_pb2.PushAdapterRequest))
    assert_serving(serving.grpc, ["tuneforge.serving.v1.AdapterService"])
    for name in ("fuzz-push", "fuzz-push-2"):
        if name in listed(admin):
            admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name=name), timeout=30)


def test_a_caller_that_leaves_has_its_requests_aborted(rollouts, serving):
    import urllib.request

    def in_flight() -> float:
        page = urllib.request.urlopen(f"{serving.http}/metrics", timeout=10).read().decode()
        return float(next(line.split()[-1] for line in page.splitlines()
                          if line.startswith("tuneforge_serving_in_flight_requests ")))

    # 2048 sequences of up to 1024 tokens (the model ends most within tens): minutes of work on
    # this CPU, if it were not aborted.
    big = request(prompts=((5, 6, 7),) * 256, n=8, max_tokens=1024, temperature=1.0)
    with pytest.raises(grpc.RpcError) as gone:
        rollouts.Generate(big, timeout=1.0)
    assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 20
    while in_flight() != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert in_flight() == 0
    started = time.perf_counter()
    assert len(rollouts.Generate(request(max_tokens=4), timeout=30).results) == 1
    assert time.perf_counter() - started < 5  # the engine is not still busy with the abandoned call
