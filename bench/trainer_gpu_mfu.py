"""bf16 full SFT on CUDA: tokens/s and MFU of a ~0.5B Llama-architecture model (random init,
config built here, no hub) against the card's peak, DDP against DeepSpeed ZeRO-2 in the same run.

What runs is the SFT recipe's step: forward, the trainer's own loss
(`services.trainer.losses.sft.sft_loss`: summed token cross-entropy / trained tokens), backward,
gradient clipping at 1.0, AdamW; every token trained (packed 2048-token rows of random ids,
no padding, causal sdpa, which is flash attention on Hopper). Each back end runs under
`torchrun --nproc_per_node <GPUs>`; weights are float32 masters with bf16 compute (DDP:
torch.autocast; ZeRO-2: DeepSpeed's bf16 mode, the same AdamW as a client optimizer).
Rank 0 times WARMUP + STEPS steps with CUDA synchronisation and reports the median step.

MFU = achieved model FLOPs / (peak bf16 dense FLOPs x GPUs), with model FLOPs per token =
6 x (non-embedding parameters + output head) + 12 x layers x hidden x sequence (attention
scores and values, forward and backward; PaLM's accounting, no recomputation counted).

    .venv/bin/python bench/trainer_gpu_mfu.py [--steps 20] [--warmup 5] [--micro_batch 8] [--seq 2048]
        [--peak_tflops 989] [--backends ddp zero2] [--compile]

Target: MFU >= 40% on an H100. Prints a skip line and exits 0 without CUDA. Not part of the test run.
(`--cpu_smoke` runs the same code on CPU with a tiny config and gloo, to check the script itself.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

# ~0.48B parameters (vocab 32000, untied head), head_dim 64.
SHAPE = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=20,
             num_attention_heads=20, num_key_value_heads=20, head_dim=64, max_position_embeddings=4096,
             tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
# Dense bf16 tensor-core peaks (no sparsity), TFLOPS, by device name; first match wins.
PEAKS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
         ("H800", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0))


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAKS if key in name), None)


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size  # attention + SwiGLU MLP matmuls
    matmul_params = layers * per_layer + h * config.vocab_size  # + the output head (the embedding is a lookup)
    return 6.0 * matmul_params + 12.0 * layers * q * seq


# ----------------------------------------------------------------------------- worker (one per rank)

def zero2_config(micro_batch: int, world: int, bf16: bool = True) -> dict:
    """ms-swift's zero2.json with its "auto" values filled in for this run."""
    return {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                  "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from services.trainer.losses.sft import sft_loss

    cpu = args.cpu_smoke
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu") if cpu else torch.device("cuda", local_rank)
    if not cpu:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    backend = "gloo" if cpu else "nccl"
    if args.backend == "zero2":
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend)
    else:
        dist.init_process_group(backend)

    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if cpu else SHAPE), attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device)  # float32 masters
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=not cpu)
    if args.backend == "zero2":
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=zero2_config(args.micro_batch, world, bf16=not cpu))
        if args.compile:
            engine.compile()
    else:
        engine = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if cpu else [local_rank])
        if args.compile:
            engine = torch.compile(engine)

    generator = torch.Generator(device="cpu").manual_seed(rank)
    tokens_per_step = args.micro_batch * args.seq

    def batch():
        ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq), generator=generator)
        return ids.to(device, non_blocking=True)

    def step() -> float:
        input_ids = batch()
        trained = tokens_per_step - args.micro_batch  # every position but the last of each row has a label
        if args.backend == "zero2":
            logits = engine(input_ids=input_ids).logits  # [b, s, vocab] bf16
            loss = sft_loss(logits, input_ids, trained)
            engine.backward(loss)
            engine.step()  # clips (gradient_clipping) and steps AdamW
        else:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=not cpu):
                logits = engine(input_ids=input_ids).logits  # [b, s, vocab]
            loss = sft_loss(logits, input_ids, trained)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if not cpu:
            torch.cuda.synchronize()

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        started = time.perf_counter()
        losses.append(step())  # .item() inside synchronises too
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    if rank == 0:
        median = statistics.median(times)
        tps = tokens_per_step * world / median
        result = {"backend": args.backend, "world": world, "parameters": params, "median_step_seconds": median,
                  "tokens_per_second": tps, "flops_per_token": flops_per_token(config, args.seq),
                  "first_loss": losses[0], "last_loss": losses[-1],
                  "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if not cpu else None,
                  "device": "cpu" if cpu else torch.cuda.get_device_name(device)}
        print("RESULT=" + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- main

def launch(args: argparse.Namespace, backend: str, nproc: int) -> dict:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        sys.exit("torchrun not found beside this Python")
    command = [torchrun, "--standalone", f"--nproc_per_node={nproc}", __file__, "--worker", "--backend", backend,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro_batch", str(args.micro_batch),
               "--seq", str(args.seq)] + (["--compile"] if args.compile else []) + (
               ["--cpu_smoke"] if args.cpu_smoke else [])
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT=")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{backend} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the card's dense bf16 peak; unset: looked up from the device name")
    parser.add_argument("--backends", nargs="+", default=["ddp", "zero2"], choices=["ddp", "zero2"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cpu_smoke", action="store_true", help="tiny config on CPU with gloo: checks the script")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=["ddp", "zero2"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    import torch

    if args.cpu_smoke:
        nproc, peak, name = 2, args.peak_tflops or 1.0, "cpu (smoke run: numbers mean nothing)"
        args.steps, args.warmup, args.micro_batch, args.seq = min(args.steps, 3), 1, 2, 64
    else:
        if not torch.cuda.is_available():
            print("skipped: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU")
            return 0
        nproc, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        peak = args.peak_tflops or peak_tflops(name)
        if peak is None:
            sys.exit(f"no known bf16 peak for {name!r}: give --peak_tflops")
    print(f"{name} x {nproc}; ~0.5B Llama (random init), bf16, micro-batch {args.micro_batch} x {args.seq} tokens, "
          f"{args.steps} timed steps after {args.warmup}; peak {peak:.0f} TFLOPS per device", file=sys.stderr)
    results = {backend: launch(args, backend, nproc) for backend in args.backends}
    first = results[args.backends[0]]
    print(f"parameters {first['parameters'] / 1e6:.0f}M, model FLOPs/token {first['flops_per_token'] / 1e9:.2f} G")
    print(f"{'case':<10} {'tokens/s':>12} {'step s':>8} {'MFU':>7} {'peak GiB':>9} {'loss first->last':>18} "
          f"{'vs ' + args.backends[0]:>9}")
    for backend, r in results.items():
        mfu = r["tokens_per_second"] * r["flops_per_token"] / (peak * 1e12 * r["world"])
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{backend:<10} {r['tokens_per_second']:>12.0f} {r['median_step_seconds']:>8.3f} {mfu * 100:>6.1f}% "
              f"{memory:>9} {r['first_loss']:>8.3f}->{r['last_loss']:<8.3f} "
              f"{r['tokens_per_second'] / first['tokens_per_second']:>8.2f}x")
    if not args.cpu_smoke:
        best = max(r["tokens_per_second"] * r["flops_per_token"] / (peak * 1e12 * r["world"]) for r in results.values())
        print(f"target: MFU >= 40% ({'met' if best >= 0.40 else 'NOT met'}: best {best * 100:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
