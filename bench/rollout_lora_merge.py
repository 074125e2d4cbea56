"""What serving's --lora_merge_single saves a rollout server: the engine process's CPU time for
one rollout (RolloutService.Generate's sampling: --prompts prompts x --n completions x
--max_tokens tokens, one rank --rank adapter, the default model) with the merged path off
(vLLM's base product + LoRA ops) against on (one product with the merged weights), and
whether the completions are the same tokens; and the same rollout on the base model without
an adapter.

One engine (started as a rollout server runs it in bench/grpo_vs_trl.py: the model in the
engine-core process, VLLM_ENABLE_V1_MULTIPROCESSING=0, --threads OMP threads, max_lora_rank
the adapter's rank), the flag switched at run time through the worker extension, the two
modes in alternating order over --rounds rounds. Each rollout is preceded by what the
trainer's PushAdapter does before it: a new version of the adapter loaded and moved into a
slot by a one-token first request (which, with the flag on, builds the merged weights), so
`push` is that cost and `generate` the rollout's. CPU seconds are the engine process's
(user + system), which move less with other load on a shared machine than wall time (they
still do: compare ratios within a run); the median over rounds and --repeats is printed.

    .venv/bin/python bench/rollout_lora_merge.py [--rounds 3] [--repeats 2] [--prompts 2] [--n 8] [--max_tokens 128]

Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import random
import statistics
import tempfile
import time

from fixtures import excerpts, random_loras


def engine_cpu_seconds() -> float:
    """User + system CPU seconds of this process's descendants (the engine-core process)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def rollout(engine, lora, rendered, sampling, seeds) -> tuple[list, float, float]:
    """The completions' token ids of one rollout, its engine CPU seconds and wall seconds, as
    services.serving.rollout runs a Generate (the prompts' requests submitted together)."""
    from services.serving.rollout import sampling_params

    async def one(prompt, seed):
        final = None
        params = sampling_params(sampling, seed)
        params.ignore_eos = True  # every completion max_tokens long: the same work in every rollout
        async for output in engine.generate(prompt, params, lora):
            final = output
        return [tuple(c.token_ids) for c in sorted(final.outputs, key=lambda c: c.index)]

    cpu, wall = engine_cpu_seconds(), time.perf_counter()
    outputs = await asyncio.gather(*(one(p, s) for p, s in zip(rendered, seeds)))
    return outputs, engine_cpu_seconds() - cpu, time.perf_counter() - wall


async def measure(args, model_dir, path):
    """(CPU and wall seconds per mode, the base model's CPU seconds, the last tokens per mode)."""
    from protos.tuneforge.serving.v1 import serving_pb2
    from services.serving.engine import Engine

    engine = Engine.start(model_dir, 4, args.rank, None, "float32", None)
    try:
        await engine.mix_safely()
        tokenizer = engine.tokenizer()
        text = excerpts(random.Random(0))
        prompts = [tokenizer.encode(text(40 + 20 * i)) for i in range(args.prompts)]
        rendered = await engine.render(prompts)
        sampled = serving_pb2.RolloutSampling(n=args.n, max_tokens=args.max_tokens, temperature=1.0)
        greedy = serving_pb2.RolloutSampling(n=1, max_tokens=args.max_tokens, temperature=0.0)  # vLLM: n 1
        seeds = [1000 * (i + 1) for i in range(args.prompts)]
        print(f"prompts of {[len(p) for p in prompts]} tokens x n {args.n} x max_tokens {args.max_tokens}, "
              f"LoRA rank {args.rank}, {args.threads} threads, {args.rounds} rounds x {args.repeats}")

        lora = None
        results = {merged: {"push": [], "generate": [], "wall": [], "tokens": []} for merged in (False, True)}
        outputs = {False: {}, True: {}}
        base = []
        for round_ in range(args.rounds + 1):  # round 0 warms up both modes
            for merged in ((False, True) if round_ % 2 == 0 else (True, False)):
                await engine.merge_single_lora(merged)
                for repeat in range(args.repeats):
                    cpu = engine_cpu_seconds()
                    previous, lora = lora, await engine.add_lora("policy", path)
                    await engine.first_request(lora)
                    push = engine_cpu_seconds() - cpu
                    if previous is not None:
                        await engine.remove_lora(previous)
                    got, seconds, wall = await rollout(engine, lora, rendered, sampled, seeds)
                    outputs[merged]["sampled"] = got
                    if round_:
                        results[merged]["push"].append(push)
                        results[merged]["generate"].append(seconds)
                        results[merged]["wall"].append(wall)
                        results[merged]["tokens"].append(sum(len(c) for group in got for c in group))
                outputs[merged]["greedy"] = (await rollout(engine, lora, rendered, greedy, seeds))[0]
            await engine.merge_single_lora(False)
            for repeat in range(args.repeats):  # the same rollout on the base model, no LoRA
                seconds = (await rollout(engine, None, rendered, sampled, seeds))[1]
                if round_:
                    base.append(seconds)
    finally:
        engine.shutdown()

    return results, base, outputs


async def main(args) -> None:
    from libs.default_model.resolve import resolve_model

    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="tuneforge-bench-merge-") as tmp:
        path = random_loras(model_dir, pathlib.Path(tmp), ["policy"], rank=args.rank)["policy"]
        results, base, outputs = await measure(args, model_dir, path)
    print(f"{'case':<28}{'vLLM LoRA ops':>16}{'merged':>12}{'ratio':>8}")
    for key, label in (("generate", "rollout CPU s (engine)"), ("push", "push CPU s (engine)"),
                       ("wall", "rollout wall s")):
        off, on = statistics.median(results[False][key]), statistics.median(results[True][key])
        print(f"{label:<28}{off:>16.3f}{on:>12.3f}{off / on:>8.2f}")
    print(f"{'rollout CPU s, base model':<28}{statistics.median(base):>16.3f} (no adapter)")
    print(f"tokens per rollout: {statistics.median(results[False]['tokens'])} / "
          f"{statistics.median(results[True]['tokens'])}")
    for kind in ("sampled", "greedy"):
        pairs = list(zip(sum(outputs[False][kind], []), sum(outputs[True][kind], [])))
        print(f"{kind} completions equal with the flag on and off: {sum(a == b for a, b in pairs)} of {len(pairs)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the default model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    asyncio.run(main(args))
