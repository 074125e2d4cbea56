"""What base-model traffic costs through our Engine on CPU (LoRA on, adapters loaded, base
rows of mixed batches masked out of vLLM's torch LoRA ops by services.serving.lora_mask)
against a plain vLLM AsyncLLM with the same engine settings (the baseline vLLM's own
server runs), and whether base answers in mixed batches stay the base model's.

One engine at a time (two engines on two cores slow each other), in alternating order
over --rounds rounds. Per engine: warm-up, then --repeats times each case, each a burst
of --requests greedy requests submitted together (max_tokens generated, ignore_eos) on
prompts of 10 to 300 tokens cut from the default model's corpus. Cases: `base` (every
request without a LoRA) and `mixed` (every other request base, the rest spread over four
random rank-8 adapters). Throughput is generated tokens/s, the median over all bursts.
`base rows changed` counts base requests in mixed bursts whose tokens differ from the
same prompt's answer in a base-only burst (0 means no base answer got an adapter).

    .venv/bin/python bench/cpu_base_lora.py [--rounds 2] [--repeats 3] [--requests 16] [--max_tokens 64]

Target: base throughput >= 0.95 x the baseline's. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time

from fixtures import excerpts, random_loras

ADAPTERS = [f"lora{i}" for i in range(1, 5)]
MAX_LORAS, MAX_LORA_RANK = 4, 16


class Ours:
    """Our serving engine, started as `tuneforge deploy` starts it."""

    name = "tuneforge Engine"

    async def start(self, model_dir, adapters):
        from services.serving.engine import Engine

        self.engine = Engine.start(model_dir, MAX_LORAS, MAX_LORA_RANK, None, "float32", None)
        await self.engine.mix_safely()
        self.loras = {name: await self.engine.add_lora(name, path) for name, path in adapters.items()}

    async def generate(self, ids, params, lora_name):
        final = None
        async for output in self.engine.generate(ids, params, self.loras.get(lora_name)):
            final = output
        return list(final.outputs[0].token_ids)

    def stop(self):
        self.engine.shutdown()


class Plain:
    """vLLM's AsyncLLM as its OpenAI server builds it for `--enable-lora --max-loras 4
    --max-lora-rank 16 --dtype float32 --disable-log-stats`, prompts rendered as its
    completions endpoint renders token ids."""

    name = "vLLM AsyncLLM"

    async def start(self, model_dir, adapters):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(model_dir), dtype="float32", enable_lora=True, max_loras=MAX_LORAS,
            max_lora_rank=MAX_LORA_RANK, disable_log_stats=True))
        self.loras = {}
        for lora_id, (name, path) in enumerate(adapters.items(), start=1):
            self.loras[name] = LoRARequest(name, lora_id, str(path))
            await self.llm.add_lora(self.loras[name])
        self.ids = iter(range(10**9))

    async def generate(self, ids, params, lora_name):
        (engine_input,) = await self.llm.renderer.render_cmpl_async([{"prompt_token_ids": ids}])
        final = None
        async for output in self.llm.generate(engine_input, params, f"bench-{next(self.ids)}",
                                              lora_request=self.loras.get(lora_name)):
            final = output
        return list(final.outputs[0].token_ids)

    def stop(self):
        self.llm.shutdown()


def prompts(model_dir: pathlib.Path, count: int) -> list[list[int]]:
    """Chat prompts of mixed length (10 to 300 tokens), rendered once so both engines get the same ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    text = excerpts(rng)
    return [tokenizer.apply_chat_template([{"role": "user", "content": text(rng.choice([5, 20, 60, 150]))}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for _ in range(count)]


async def burst(engine, ids: list[list[int]], loras: list[str | None], max_tokens: int):
    """All requests at once: (generated tokens/s, each request's token ids)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    started = time.perf_counter()
    outputs = await asyncio.gather(*(engine.generate(p, params, lora) for p, lora in zip(ids, loras)))
    seconds = time.perf_counter() - started
    return sum(map(len, outputs)) / seconds, outputs


async def session(engine, model_dir, adapters, ids, args, samples, changed):
    cases = {"base": [None] * len(ids),
             "mixed": [None if i % 2 == 0 else ADAPTERS[(i // 2) % len(ADAPTERS)] for i in range(len(ids))]}
    started = time.perf_counter()
    await engine.start(model_dir, adapters)
    print(f"  {engine.name} ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    try:
        for loras in cases.values():  # warm-up: every adapter into its slot, caches, kernels
            await burst(engine, ids, loras, args.max_tokens)
        for _ in range(args.repeats):
            rate, base_answers = await burst(engine, ids, cases["base"], args.max_tokens)
            samples[engine.name, "base"].append(rate)
            rate, mixed_answers = await burst(engine, ids, cases["mixed"], args.max_tokens)
            samples[engine.name, "mixed"].append(rate)
            base_rows = [i for i, lora in enumerate(cases["mixed"]) if lora is None]
            changed[engine.name][0] += sum(mixed_answers[i] != base_answers[i] for i in base_rows)
            changed[engine.name][1] += len(base_rows)
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from libs.default_model.resolve import resolve_model

    model_dir = resolve_model(None)
    adapters = random_loras(model_dir, pathlib.Path(tempfile.mkdtemp(prefix="bench-cpu-base-")), ADAPTERS)
    ids = prompts(model_dir, args.requests)
    engines = [Ours(), Plain()]
    samples = {(engine.name, case): [] for engine in engines for case in ("base", "mixed")}
    changed = {engine.name: [0, 0] for engine in engines}
    for round_ in range(args.rounds):
        for engine in (engines if round_ % 2 == 0 else engines[::-1]):
            asyncio.run(session(engine, model_dir, adapters, ids, args, samples, changed))
        print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ours, plain = engines[0].name, engines[1].name
    print(f"\n{args.rounds} rounds x {args.repeats} bursts of {args.requests} requests, max_tokens {args.max_tokens}, "
          f"greedy, ignore_eos; max_loras {MAX_LORAS}, max_lora_rank {MAX_LORA_RANK}, float32; "
          f"baseline: {plain} (same engine settings)")
    print(f"{'case':<32}{'baseline':>12}{'ours':>12}{'ratio':>9}")
    for case in ("base", "mixed"):
        v, t = statistics.median(samples[plain, case]), statistics.median(samples[ours, case])
        spread = lambda name: f"{min(samples[name, case]):.0f}-{max(samples[name, case]):.0f}"  # noqa: E731
        print(f"{case + ' gen tok/s (median)':<32}{v:>12.1f}{t:>12.1f}{t / v:>9.3f}"
              f"   (range: baseline {spread(plain)}, ours {spread(ours)})")
    print(f"{'mixed: base rows changed':<32}{'%d/%d' % tuple(changed[plain]):>12}{'%d/%d' % tuple(changed[ours]):>12}")
    ratio = statistics.median(samples[ours, "base"]) / statistics.median(samples[plain, "base"])
    print(f"target (base throughput >= 0.95 x baseline): {'met' if ratio >= 0.95 else 'MISSED'} ({ratio:.3f}); "
          f"base answers in mixed batches: {'unchanged' if changed[ours][0] == 0 else 'CHANGED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
