"""What base-model traffic costs through our Engine on CPU (LoRA on, adapters loaded, base
rows of mixed batches masked out of vLLM's torch LoRA ops by services.serving.lora_mask)
against a plain vLLM AsyncLLM with the same engine settings (the baseline vLLM's own
server runs), and whether base answers in mixed batches stay the base model's.

One engine at a time (two engines on two cores slow each other), in alternating order
over --rounds rounds. Per engine: warm-up, then --repeats times each case, each a burst
of --requests greedy requests submitted together (max_tokens generated, ignore_eos) on
prompts of 10 to 300 tokens cut from the default model's corpus. Cases: `base` (every
request without a LoRA) and `mixed` (every other request base, the rest spread over four
random rank-8 adapters). Throughput is generated tokens/s, the median over all bursts;
CPU ms/token is the CPU time of this process tree per generated token (the work done,
less sensitive than wall time to other load on a shared machine).
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


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants (vLLM's engine core and worker)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, ()))
        if current in stats:
            total += int(stats[current][11]) + int(stats[current][12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


async def burst(engine, ids: list[list[int]], loras: list[str | None], max_tokens: int):
    """All requests at once: (generated tokens/s, CPU ms per generated token, each request's token ids)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    cpu, started = tree_cpu_seconds(os.getpid()), time.perf_counter()
    outputs = await asyncio.gather(*(engine.generate(p, params, lora) for p, lora in zip(ids, loras)))
    seconds, cpu = time.perf_counter() - started, tree_cpu_seconds(os.getpid()) - cpu
    tokens = sum(map(len, outputs))
    return tokens / seconds, 1000 * cpu / tokens, outputs


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
            *sample, base_answers = await burst(engine, ids, cases["base"], args.max_tokens)
            samples[engine.name, "base"].append(sample)
            *sample, mixed_answers = await burst(engine, ids, cases["mixed"], args.max_tokens)
            samples[engine.name, "mixed"].append(sample)
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
    print(f"{'case':<34}{'baseline':>12}{'ours':>12}{'ratio':>9}")
    medians = {}
    for case in ("base", "mixed"):
        for column, unit in ((0, "gen tok/s"), (1, "CPU ms/token")):
            v, t = (statistics.median(s[column] for s in samples[name, case]) for name in (plain, ours))
            medians[case, column] = t / v
            ranges = ", ".join(f"{label} {min(s[column] for s in samples[name, case]):.2f}-"
                               f"{max(s[column] for s in samples[name, case]):.2f}"
                               for label, name in (("baseline", plain), ("ours", ours)))
            print(f"{f'{case} {unit} (median)':<34}{v:>12.2f}{t:>12.2f}{t / v:>9.3f}   (range: {ranges})")
    print(f"{'mixed: base rows changed':<34}{'%d/%d' % tuple(changed[plain]):>12}{'%d/%d' % tuple(changed[ours]):>12}")
    ratio = medians["base", 0]
    print(f"target (base throughput >= 0.95 x baseline): {'met' if ratio >= 0.95 else 'MISSED'} ({ratio:.3f}); "
          f"base answers in mixed batches: {'unchanged' if changed[ours][0] == 0 else 'CHANGED'}")
    print("CPU ms/token: CPU time of this process and its children (vLLM's engine core and worker) per "
          "generated token; less sensitive than tok/s to other load on a shared machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
