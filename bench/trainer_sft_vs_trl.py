"""LoRA SFT throughput and memory of TuneForge's trainer against TRL's SFTTrainer with
packing (trl 1.16: best-fit-decreasing packing, padding-free batches), in one run on this CPU.

The same model (a random-init Llama built here, about 20M parameters, the default model's
tokenizer), the same rows (synthetic conversations prepared once by a real dataprep
service; TRL gets those very rows as input_ids + completion_mask and packs them itself, we
read dataprep's packed rows over gRPC when dataprep packs, its plain rows otherwise), the
same LoRA config (r 8, alpha 32, dropout 0.05, all-linear), lr 1e-4 constant, weight decay
0.1, clip 1.0, batch 2 x max_length 1024, float32, no gradient checkpointing (TRL's SFTConfig
turns it on by default: the `trl-default` row keeps that default, for reference; the ratio
that counts is against TRL with the same settings as ours), the same steps. Each trainer runs alone
in its own process (so peak RSS is its own; the dataprep service runs in this parent),
then the order is repeated ROUNDS times and the median kept. Tokens are counted the same
way on both sides: non-padding input tokens. A step's time is wall time from the end of the
previous step (data loading included); the first WARMUP steps are not timed. Both the
aggregate tokens/s (all timed tokens / all timed seconds) and the median over timed steps of
a step's tokens/s are printed; on a shared machine the median is the steadier of the two.
The rounds alternate ours / TRL so that load from other processes falls on both.

    .venv/bin/python bench/trainer_sft_vs_trl.py [--steps 10] [--warmup 3] [--rounds 2] [--threads 2] [--trl_default]

Targets: ours >= 1.2x TRL's tokens/s; data wait < 2% of our step time. Not part of the test run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import fixtures  # bench/fixtures.py: the model and texts the benchmarks share

REPO = pathlib.Path(__file__).resolve().parents[1]

MAX_LENGTH = 1024
BATCH = 2
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
OPTIM = dict(learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0, seed=42)
MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)


# ----------------------------------------------------------------------------- set-up (parent)

def prepare(address: str, model_dir: pathlib.Path, raw: pathlib.Path, out: pathlib.Path, packing: bool) -> dict:
    from libs.dataset import client
    from services.dataprep.config import PrepareConfig

    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    extra = {"packing": True} if packing else {}
    config = PrepareConfig(model=str(model_dir), dataset=[str(raw)], output_dir=str(out), max_length=MAX_LENGTH,
                           **{k: v for k, v in extra.items() if k in fields})
    return client.prepare(address, config)


def rows_for_trl(address: str, dataset_dir: pathlib.Path, out: pathlib.Path) -> int:
    """The prepared (unpacked) rows, read over the same RPC our trainer uses, as JSONL with
    input_ids and completion_mask (1 where dataprep's labels train the token)."""
    from libs.dataset.client import read_batches
    from services.trainer.data import batch_rows
    from libs.dataset.schema import IGNORE_INDEX

    count = 0
    with open(out, "w") as f:
        for batch, _cursor in read_batches(address, str(dataset_dir), max_batch_rows=256):
            for row in batch_rows(batch):
                f.write(json.dumps({"input_ids": row.input_ids.tolist(),
                                    "completion_mask": (row.labels != IGNORE_INDEX).astype(int).tolist()}) + "\n")
                count += 1
    return count


# ----------------------------------------------------------------------------- workers (one process each)

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def summarise(times: list[float], tokens: list[int], waits: list[float], warmup: int) -> dict:
    per_step = {"step_seconds": [round(t, 3) for t in times], "step_tokens": tokens}
    times, tokens, waits = times[warmup:], tokens[warmup:], waits[warmup:]
    return {**per_step, "steps": len(times), "seconds": sum(times), "tokens": sum(tokens),
            "tokens_per_second": sum(tokens) / sum(times), "median_step_seconds": statistics.median(times),
            # robust to another process taking the cores for a while (this machine is shared)
            "median_step_tokens_per_second": statistics.median(n / t for n, t in zip(tokens, times)),
            "data_wait_fraction": (sum(waits) / sum(times)) if waits else None, "peak_rss_mib": peak_rss_mib()}


def worker_ours(spec: dict) -> dict:
    import torch

    from services.trainer import training
    from services.trainer.config import TrainConfig

    torch.set_num_threads(spec["threads"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = dict(model=spec["model"], dataset=spec["dataset"], dataprep_address=spec["dataprep"],
                  output_dir=spec["output_dir"], train_type="lora", lora_rank=LORA["r"],
                  lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], target_modules=["all-linear"],
                  lr_scheduler_type="constant", per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                  max_steps=spec["steps"], save_steps=10**6, logging_steps=1, **OPTIM)
    if "packing" in fields:
        values["packing"] = spec["packed"]
    if "max_length" in fields:
        values["max_length"] = MAX_LENGTH
    times, tokens, waits = [], [], []

    def report(event: str, **fields_: object) -> None:
        if event == "progress":
            times.append(float(fields_["seconds"]))
            tokens.append(int(fields_["tokens"]))
            waits.append(float(fields_["data_wait_seconds"]))

    training.train(TrainConfig(**values), report)
    # logging.jsonl is the user-visible record of the same numbers: check they agree
    logged = [json.loads(line) for line in (pathlib.Path(spec["output_dir"]) / "logging.jsonl").read_text().splitlines()
              if line.strip()]
    logged_wait = sum(e.get("data_wait_seconds", 0.0) for e in logged if "loss" in e)
    result = summarise(times, tokens, waits, spec["warmup"])
    result["logged_data_wait_seconds"] = logged_wait
    return result


def worker_trl(spec: dict, default_checkpointing: bool = False) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(spec["threads"])
    dataset = load_dataset("json", data_files=spec["trl_rows"], split="train")
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = SFTConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, lr_scheduler_type="constant", packing=True,
                     packing_strategy="bfd", padding_free=True, max_length=MAX_LENGTH, completion_only_loss=True,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                     bf16=False, fp16=False, gradient_checkpointing=default_checkpointing, **OPTIM)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    seen: list[int] = []
    training_step = trainer.training_step

    def counting(model_, inputs, *rest, **kwargs):
        # what is trained: padding-free rows have no padding; else the attention mask marks real tokens
        seen.append(int(inputs["attention_mask"].sum()) if "attention_mask" in inputs and "position_ids" not in inputs
                    else int(inputs["input_ids"].numel()))
        return training_step(model_, inputs, *rest, **kwargs)

    trainer.training_step = counting
    times, tokens = [], []

    class Clock(TrainerCallback):
        last = None

        def on_train_begin(self, *_args, **_kwargs):
            Clock.last = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            now = time.perf_counter()
            times.append(now - Clock.last)
            Clock.last = now
            tokens.append(sum(seen))
            seen.clear()

    trainer.add_callback(Clock())
    trainer.train()
    return summarise(times, tokens, [], spec["warmup"])


def run_worker(kind: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT=")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{kind} worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


# ----------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--trl_default", action="store_true",
                        help="also run TRL with its own default gradient_checkpointing=True")
    parser.add_argument("--worker", choices=["ours", "trl", "trl-default"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        result = worker_ours(spec) if args.worker == "ours" else worker_trl(spec, args.worker == "trl-default")
        print("RESULT=" + json.dumps(result), flush=True)
        return 0

    from libs.common.server import create_server
    from services.dataprep.config import PrepareConfig
    from services.dataprep.servicer import DataprepServicer, register

    servicer = DataprepServicer()
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    address = f"127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
            root = pathlib.Path(tmp)
            params = fixtures.random_llama(root / "model", MODEL_SHAPE)
            fixtures.write_conversations(root / "conversations.jsonl", args.rows)
            plain = prepare(address, root / "model", root / "conversations.jsonl", root / "plain", packing=False)
            packed = "packing" in {f.name for f in dataclasses.fields(PrepareConfig)}
            ours_dataset = root / "plain"
            if packed:
                prepare(address, root / "model", root / "conversations.jsonl", root / "packed", packing=True)
                ours_dataset = root / "packed"
            rows = rows_for_trl(address, root / "plain", root / "trl_rows.jsonl")
            print(f"model: random-init Llama, {params / 1e6:.1f}M parameters, "
                  f"hidden {MODEL_SHAPE['hidden_size']} x {MODEL_SHAPE['num_hidden_layers']} layers; data: {rows} rows, "
                  f"{plain.get('tokens', '?')} tokens; ours reads {'dataprep-packed' if packed else 'unpacked'} rows; "
                  f"batch {BATCH} x max_length {MAX_LENGTH}, {args.steps} steps ({args.warmup} warm-up), "
                  f"{args.threads} threads", file=sys.stderr)
            kinds = ["ours", "trl"] + (["trl-default"] if args.trl_default else [])
            results: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for round_ in range(args.rounds):
                for kind in kinds:
                    spec = {"model": str(root / "model"), "dataset": str(ours_dataset), "dataprep": address,
                            "trl_rows": str(root / "trl_rows.jsonl"), "output_dir": str(root / f"{kind}-{round_}"),
                            "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "packed": packed}
                    result = run_worker(kind, spec)
                    results[kind].append(result)
                    print(f"round {round_ + 1} {kind}: {result['tokens_per_second']:.0f} tokens/s, step seconds "
                          f"{result['step_seconds']}, step tokens {result['step_tokens']}, peak RSS "
                          f"{result['peak_rss_mib']:.0f} MiB, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        servicer.shutdown(1)
        server.stop(1).wait()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    ours_tps, trl_tps = median("ours", "tokens_per_second"), median("trl", "tokens_per_second")
    ours_step_tps, trl_step_tps = (median("ours", "median_step_tokens_per_second"),
                                   median("trl", "median_step_tokens_per_second"))
    ours_rss, trl_rss = median("ours", "peak_rss_mib"), median("trl", "peak_rss_mib")
    wait = median("ours", "data_wait_fraction")
    print(f"{'case':<32} {'baseline (TRL SFTTrainer)':>26} {'ours':>12} {'ratio':>8}")
    print(f"{'tokens/s (non-pad), median step':<32} {trl_step_tps:>26.0f} {ours_step_tps:>12.0f} "
          f"{ours_step_tps / trl_step_tps:>7.2f}x")
    print(f"{'tokens/s (non-pad), aggregate':<32} {trl_tps:>26.0f} {ours_tps:>12.0f} {ours_tps / trl_tps:>7.2f}x")
    print(f"{'median step seconds':<32} {median('trl', 'median_step_seconds'):>26.3f} "
          f"{median('ours', 'median_step_seconds'):>12.3f} "
          f"{median('ours', 'median_step_seconds') / median('trl', 'median_step_seconds'):>7.2f}x")
    print(f"{'peak RSS MiB':<32} {trl_rss:>26.0f} {ours_rss:>12.0f} {ours_rss / trl_rss:>7.2f}x")
    print(f"{'data wait / step time':<32} {'-':>26} {wait * 100:>11.2f}% {'':>8}")
    if args.trl_default:
        default_tps, default_rss = median("trl-default", "tokens_per_second"), median("trl-default", "peak_rss_mib")
        print(f"{'tokens/s vs TRL default*':<32} {default_tps:>26.0f} {ours_tps:>12.0f} {ours_tps / default_tps:>7.2f}x")
        print(f"{'peak RSS vs TRL default*':<32} {default_rss:>26.0f} {ours_rss:>12.0f} {ours_rss / default_rss:>7.2f}x")
        print("* TRL's SFTConfig default gradient_checkpointing=True (recomputes activations: less memory, more compute)")
    print(f"targets: tokens/s ratio (median step) >= 1.20 "
          f"({'met' if ours_step_tps / trl_step_tps >= 1.2 else 'NOT met'}); "
          f"data wait < 2% ({'met' if wait < 0.02 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
