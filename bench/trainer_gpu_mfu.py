"""bf16 full SFT through TuneForge's own training engine: tokens/s and MFU of a ~0.5B
Llama-architecture model (random init, config built here, no hub) against the card's peak;
ZeRO-2 and FSDP2 against DDP on the GPUs present.

What is timed is the product's step, nothing copied: each case is a TrainConfig run by the
trainer's recipe (services.trainer.training.train: the sft method's forward and loss, the
engine's autocast / back end, backward, clipping, AdamW, the dataprep gRPC stream) in the
trainer's own worker process, as the trainer service starts a job (services.trainer.worker;
for several devices it launches torchrun, as `NPROC_PER_NODE=N tuneforge sft` does). The time and tokens
of each step are read from its `progress` events (the step's wall time and its real tokens
over every rank); the median over the timed steps is reported. The data are prepared by
dataprep: random texts, task pt (every token trained), packed into rows of --seq tokens.

MFU = achieved model FLOPs / (peak bf16 dense FLOPs x devices), model FLOPs per token =
6 x (matmul parameters + output head) + 12 x layers x hidden x sequence (attention scores
and values, forward and backward; PaLM's accounting, no recomputation counted).

    .venv/bin/python bench/trainer_gpu_mfu.py [--steps 20] [--warmup 5] [--micro_batch 8] [--seq 2048]
        [--attn_impl sdpa|flash_attention_2] [--peak_tflops T] [--backends single ddp zero2 fsdp]
    .venv/bin/python bench/trainer_gpu_mfu.py --cpu_smoke    # the same code on the CPU, tiny config

Target: MFU >= 40% on an H100. Without CUDA (and without --cpu_smoke) it prints a skip line
and exits 0. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

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


def flops_per_token(shape: dict, seq: int) -> float:
    """Training FLOPs per token (forward + backward)."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    q = shape["num_attention_heads"] * shape["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * shape["intermediate_size"]  # attention + SwiGLU MLP matmuls
    matmul_params = layers * per_layer + h * shape["vocab_size"]  # + the output head (the embedding is a lookup)
    return 6.0 * matmul_params + 12.0 * layers * q * seq


# ----------------------------------------------------------------------------- setup

def build_model(where: pathlib.Path, shape: dict) -> tuple[pathlib.Path, int, dict]:
    """A random-init Llama with the default model's tokenizer, saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from libs.default_model.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    shape = {**shape, "vocab_size": max(shape["vocab_size"], len(tokenizer))}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.to(torch.bfloat16).save_pretrained(where)  # loaded back as float32 masters (full training)
    tokenizer.save_pretrained(where)
    return where, sum(p.numel() for p in model.parameters()), shape


def prepare_data(address: str, model_dir: pathlib.Path, where: pathlib.Path, rows: int, seq: int) -> str:
    """`rows` packed rows of about `seq` tokens: random texts of seq/4 tokens each, task pt."""
    from transformers import AutoTokenizer

    from libs.dataset import client as dataprep_client
    from services.dataprep.config import PrepareConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(0)
    raw = where / "texts.jsonl"
    target = seq // 4 - 8
    with raw.open("w") as f:
        for _ in range(rows * 4):
            # random ids decode to text that encodes to more tokens: cut it back to the target
            text = tokenizer.decode([rng.choice(vocab) for _ in range(target)])
            text = tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:target])
            f.write(json.dumps({"text": text}) + "\n")
    prepared = where / "prepared"
    manifest = dataprep_client.prepare(address, PrepareConfig(model=str(model_dir), dataset=[str(raw)],
                                                              output_dir=str(prepared), task="pt", packing=True,
                                                              max_length=seq))
    print(f"dataprep: {manifest['rows_out']} texts, {manifest['tokens']} tokens, packed into "
          f"{manifest['packing']['bins']} rows of up to {seq} tokens", file=sys.stderr)
    return str(prepared)


# ----------------------------------------------------------------------------- one case

def run_case(case: str, nproc: int, args, model_dir, dataset, address, out: pathlib.Path) -> dict:
    """One TrainConfig through the trainer: {median step seconds, tokens/s, losses}."""
    from libs.common import config as cfg
    from services.trainer.config import TrainConfig

    backend = {"zero2": {"deepspeed": "zero2"}, "fsdp": {"fsdp": True}}.get(case, {})
    config = TrainConfig(model=str(model_dir), dataset=dataset, dataprep_address=address, output_dir=str(out),
                         train_type="full", torch_dtype="bfloat16", attn_impl=args.attn_impl,
                         device="cpu" if args.cpu_smoke else "auto", per_device_train_batch_size=args.micro_batch,
                         max_steps=args.warmup + args.steps, save_steps=10**6, learning_rate=1e-5,
                         lr_scheduler_type="constant", nproc_per_node=nproc, seed=0, **backend)
    problems = config.problems()
    if problems:
        sys.exit(f"{case}: " + "; ".join(problems))
    # the trainer service's way: its worker process (which launches torchrun for several processes),
    # events as JSON lines on stdout; the dataprep server stays in this process, out of the way
    path = out.parent / f"{case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.save_json(config, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RANK", None)
    if args.cpu_smoke:  # one intra-op thread a process, as the ddp ranks get on a small CPU box
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "services.trainer.worker", "--config", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        sys.exit(f"{case} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - started
    steps = [e for e in events if e["event"] == "progress"][args.warmup:]
    logged = [e for e in events if e["event"] == "step"]
    first = next(e for e in events if e["event"] == "started")
    seconds = statistics.median(e["seconds"] for e in steps)
    return {"case": case, "world": nproc, "device": first.get("device"), "median_step_seconds": seconds,
            "tokens_per_second": statistics.median(e["tokens"] / e["seconds"] for e in steps),
            "tokens_per_step": statistics.median(e["tokens"] for e in steps),
            "first_loss": logged[0]["loss"], "last_loss": logged[-1]["loss"], "wall_seconds": wall}


# ----------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro_batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--attn_impl", default=None,
                        help="sdpa, eager, flash_attention_2, ...; unset: flash_attention_2 when flash_attn is "
                             "installed, else sdpa")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the card's dense bf16 peak; unset: looked up from the device name")
    parser.add_argument("--backends", nargs="+", default=None, choices=["single", "ddp", "zero2", "fsdp"],
                        help="unset: single, then ddp, zero2 and fsdp when there are 2 devices or more")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="tiny config on the CPU (2 gloo processes for ddp/zero2/fsdp): checks the script")
    parser.add_argument("--workdir", default=None, help="where the model, data and runs go (unset: a temp dir)")
    args = parser.parse_args()

    import importlib.util

    import torch

    if args.cpu_smoke:
        name, nproc, peak = "cpu (smoke run: the numbers mean nothing)", 2, None
        args.steps, args.warmup, args.micro_batch, args.seq = min(args.steps, 3), 1, 2, 128
        backends = args.backends or ["single", "ddp"]
    else:
        if not torch.cuda.is_available():
            print("skipped: no CUDA device (torch.cuda.is_available() is False); this benchmark needs a GPU "
                  "(--cpu_smoke runs it on the CPU with a tiny model)")
            return 0
        nproc, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        peak = args.peak_tflops or peak_tflops(name)
        if peak is None:
            sys.exit(f"no known bf16 peak for {name!r}: give --peak_tflops")
        backends = args.backends or (["single", "ddp", "zero2", "fsdp"] if nproc > 1 else ["single"])
    if args.attn_impl is None:
        has_flash = importlib.util.find_spec("flash_attn") is not None and not args.cpu_smoke
        args.attn_impl = "flash_attention_2" if has_flash else "sdpa"
    shape = TINY if args.cpu_smoke else SHAPE

    from libs.common.server import create_server
    from services.dataprep.servicer import DataprepServicer, register

    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="tuneforge-mfu-"))
    servicer = DataprepServicer()
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    address = f"127.0.0.1:{port}"
    try:
        model_dir, params, shape = build_model(workdir / "model", shape)
        # two epochs' worth at the widest case; epochs repeat for the rest of the steps
        dataset = prepare_data(address, model_dir, workdir, rows=max(4, args.micro_batch * nproc * 2), seq=args.seq)
        print(f"{name} x {nproc}; Llama {params / 1e6:.1f}M (random init), bf16 autocast over float32 masters, "
              f"full SFT, micro-batch {args.micro_batch} x {args.seq} packed tokens, attn {args.attn_impl}, "
              f"{args.steps} timed steps after {args.warmup}" + (f"; peak {peak:.0f} TFLOPS a device" if peak else ""),
              file=sys.stderr)
        results = []
        for case in backends:
            world = 1 if case == "single" else nproc
            results.append(run_case(case, world, args, model_dir, dataset, address, workdir / "runs" / case))
            print(f"  {case}: done in {results[-1]['wall_seconds']:.0f} s", file=sys.stderr)
    finally:
        servicer.shutdown(1)
        server.stop(1).wait()

    per_token = flops_per_token(shape, args.seq)
    print(f"parameters {params / 1e6:.1f}M, model FLOPs/token {per_token / 1e9:.3f} G, "
          f"attn_impl {args.attn_impl}, device {results[0]['device']}")
    baseline = next((r for r in results if r["case"] == "ddp"), None)
    print(f"{'case':<8} {'procs':>5} {'tokens/s':>12} {'step s':>8} {'MFU':>7} "
          f"{'loss first->last':>18} {'baseline':>9} {'ratio':>6}")
    for r in results:
        mfu = f"{r['tokens_per_second'] * per_token / (peak * 1e12 * r['world']) * 100:6.1f}%" if peak else "    n/a"
        compare = baseline if baseline and r["case"] in ("zero2", "fsdp") else None
        ratio = f"{r['tokens_per_second'] / compare['tokens_per_second']:.2f}x" if compare else "-"
        print(f"{r['case']:<8} {r['world']:>5} {r['tokens_per_second']:>12.0f} {r['median_step_seconds']:>8.3f} "
              f"{mfu} {r['first_loss']:>8.3f}->{r['last_loss']:<8.3f} "
              f"{'ddp' if compare else '-':>9} {ratio:>6}")
    if peak:
        best = max(r["tokens_per_second"] * per_token / (peak * 1e12 * r["world"]) for r in results)
        print(f"target: MFU >= 40% ({'met' if best >= 0.40 else 'NOT met'}: best {best * 100:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
