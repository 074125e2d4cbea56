"""What a GRPO rollout costs on vLLM, both ways, with the default model and a LoRA policy (r 8,
all linear layers): engine start, weight sync (a new adapter version) and generation of
P prompts x G completions, for --vllm_mode colocate (an in-process engine) and --vllm_mode
server (the serving service over gRPC, the adapter pushed as bytes). The two engines run one
after the other, never at once. Medians over --rounds rounds (sync, then generate).

    PYTHONPATH=$PWD python bench/rollout_vllm_sync.py [--prompts 8] [--generations 8] [--max_tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time


def policy(model_dir, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def step_weights(model, round_: int) -> None:
    """Stands in for an optimizer step: every LoRA B matrix moves."""
    import torch

    generator = torch.Generator().manual_seed(round_)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def measure(generator, model, prompts, sampling, rounds: int) -> dict[str, float]:
    syncs, gens, tokens = [], [], []
    for round_ in range(rounds):
        step_weights(model, round_)
        started = time.perf_counter()
        generator.sync(model, step=round_)
        syncs.append(time.perf_counter() - started)
        seeds = [1000 * round_ + i for i in range(len(prompts))]
        started = time.perf_counter()
        out = generator.generate(prompts, seeds, sampling)
        gens.append(time.perf_counter() - started)
        tokens.append(sum(len(c.token_ids) for group in out for c in group))
    return {"sync_s": statistics.median(syncs), "generate_s": statistics.median(gens),
            "tokens": statistics.median(tokens), "tokens_per_s": statistics.median(t / g for t, g in zip(tokens, gens))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import random

    from libs.default_model.resolve import resolve_model
    from services.trainer.rollout.base import Sampling

    model_dir = resolve_model(None)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 3000) for _ in range(16)] for _ in range(args.prompts)]
    sampling = Sampling(n=args.generations, max_tokens=args.max_tokens, temperature=0.9, stop_token_ids=(2,))
    model = policy(model_dir, args.rank)
    rows = {}

    from services.trainer.rollout.vllm_colocate import ColocateGenerator

    colocate = ColocateGenerator(model_dir, lora_rank=args.rank, max_model_len=256, seed=0)
    try:
        rows["colocate"] = {"start_s": colocate.started_seconds,
                            **measure(colocate, model, prompts, sampling, args.rounds)}
    finally:
        colocate.close()

    from cli.stack import Stack
    from services.trainer.rollout.vllm_server import ServerGenerator

    with tempfile.TemporaryDirectory() as logs, Stack(pathlib.Path(logs)) as stack:
        started = time.perf_counter()
        serving = stack.start_serving(model=str(model_dir))
        start = time.perf_counter() - started
        server = ServerGenerator(serving.grpc_address, job="bench-rollout", base_model=model_dir, lora_rank=args.rank)
        try:
            rows["server"] = {"start_s": start, **measure(server, model, prompts, sampling, args.rounds)}
        finally:
            server.close()

    print(f"default model, LoRA r{args.rank}, {args.prompts} prompts x {args.generations} completions x <= "
          f"{args.max_tokens} tokens, temperature 0.9; medians of {args.rounds} rounds")
    print(f"{'mode':<10} {'start s':>8} {'sync s':>8} {'generate s':>11} {'tokens':>7} {'tokens/s':>9}")
    for mode, row in rows.items():
        print(f"{mode:<10} {row['start_s']:>8.2f} {row['sync_s']:>8.3f} {row['generate_s']:>11.3f} "
              f"{row['tokens']:>7.0f} {row['tokens_per_s']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
