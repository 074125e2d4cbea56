"""DPO LoRA throughput and memory of TuneForge's trainer against TRL 1.16's DPOTrainer, in one
run on this CPU; then ours on packed pairs (dataprep --packing true) against TRL padded (TRL
cannot pack preference data: its padding_free falls back to padding, trl#2469).

The same model (a random-init Llama built here, about 20M parameters, the default model's
tokenizer), the same pairs (synthetic conversations with a chosen and a rejected answer of
independent lengths, prepared once by a real dataprep service; TRL gets those very token ids,
each pair split into prompt / chosen / rejected at its first label, and reads them in the same
order), the same LoRA config (r 8, alpha 32, dropout 0, all-linear: TRL turns dropout off for
DPO by default), beta 0.1, sigmoid loss, the reference = the base with the adapter disabled on
both sides, lr 1e-4 constant, weight decay 0.1, clip 1.0, batch 2 pairs, float32, no gradient
checkpointing, the same steps. Ours is the product's own path: services.trainer.training.train
with the dpo method, reading the prepared pairs over gRPC from the dataprep service running in
this parent. Each trainer runs alone in its own process (so peak RSS is its own), one at a
time, the order reversed every round; the median over rounds is kept. Tokens are counted the
same way on both sides: non-padding input tokens of chosen and rejected sequences. A step's
time is wall time from the end of the previous step (data loading included), and beside it the
process's CPU time over the same span: on a machine other processes share, CPU time moves
much less with their load than wall time does (one thread a process by default, so no thread
waits for a core another process holds). The first WARMUP steps are not timed. Packed: one packed row of up to MAX_LENGTH tokens per step (several
pairs), so the comparison is tokens/s, not steps.

    .venv/bin/python bench/rlhf_dpo_vs_trl.py [--steps 10] [--warmup 3] [--rounds 3] [--threads 1]

Target: ours >= 1.2x TRL's tokens/s unpacked; packing's gain is printed. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import fixtures  # bench/fixtures.py: the model and texts the benchmarks share

REPO = pathlib.Path(__file__).resolve().parents[1]

MAX_LENGTH = 1024  # a packed row; a pair (both sides) fits in it
BATCH = 2  # pairs per step (unpacked); packed: rows per step
PACKED_BATCH = 1
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
OPTIM = dict(learning_rate=1e-4, weight_decay=0.1, max_grad_norm=1.0, seed=42)
BETA = 0.1
MODEL_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=True)


# ----------------------------------------------------------------------------- set-up (parent)

def write_pairs(path: pathlib.Path, rows: int, seed: int = 0) -> None:
    """Pairs of a prompt (5 to 60 words) and two answers of independent lengths (15 to 200
    words), cut from the default model's corpus: padding a pair's short side to its long one is
    what packing saves."""
    rng = random.Random(seed)
    text = fixtures.excerpts(rng)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": text(rng.randint(5, 60))},
                                             {"role": "assistant", "content": text(rng.choice([15, 40, 100, 200]))}],
                                "rejected_response": text(rng.choice([15, 40, 100, 200]))}) + "\n")


def prepare(address: str, model_dir: pathlib.Path, raw: pathlib.Path, out: pathlib.Path, packing: bool) -> dict:
    from libs.dataset import client
    from services.dataprep.config import PrepareConfig

    return client.prepare(address, PrepareConfig(model=str(model_dir), dataset=[str(raw)], output_dir=str(out),
                                                 max_length=MAX_LENGTH, packing=packing))


def pairs_for_trl(address: str, dataset_dir: pathlib.Path, out: pathlib.Path) -> int:
    """The prepared (unpacked) pairs, read over the same RPC our trainer uses, as JSONL of
    TRL's tokenized columns: the prompt (tokens before the first label), each answer's tokens."""
    import numpy as np

    from libs.dataset.client import read_batches
    from libs.dataset.schema import IGNORE_INDEX
    from services.trainer.data import batch_rows

    def split(side) -> tuple[list[int], list[int]]:
        first = int(np.flatnonzero(side.labels != IGNORE_INDEX)[0])
        return side.input_ids[:first].tolist(), side.input_ids[first:].tolist()

    count = 0
    with open(out, "w") as f:
        for batch, _cursor in read_batches(address, str(dataset_dir), max_batch_rows=256):
            for pair in batch_rows(batch):
                prompt, chosen = split(pair.chosen)
                rejected_prompt, rejected = split(pair.rejected)
                assert prompt == rejected_prompt
                f.write(json.dumps({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}) + "\n")
                count += 1
    return count


# ----------------------------------------------------------------------------- workers (one process each)

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def summarise(times: list[float], cpu: list[float], tokens: list[int], warmup: int) -> dict:
    per_step = {"step_seconds": [round(t, 3) for t in times], "step_tokens": tokens}
    times, cpu, tokens = times[warmup:], cpu[warmup:], tokens[warmup:]
    return {**per_step, "steps": len(times), "seconds": sum(times), "tokens": sum(tokens),
            "tokens_per_second": sum(tokens) / sum(times), "median_step_seconds": statistics.median(times),
            # robust to another process taking the cores for a while (this machine is shared)
            "median_step_tokens_per_second": statistics.median(n / t for n, t in zip(tokens, times)),
            "tokens_per_cpu_second": sum(tokens) / sum(cpu), "peak_rss_mib": peak_rss_mib()}


def worker_ours(spec: dict) -> dict:
    import torch

    from services.trainer import training
    from services.trainer.config import DpoConfig, TrainConfig

    torch.set_num_threads(spec["threads"])
    config = TrainConfig(model=spec["model"], dataset=spec["dataset"], dataprep_address=spec["dataprep"],
                         output_dir=spec["output_dir"], train_type="lora", lora_rank=LORA["r"],
                         lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"], target_modules=["all-linear"],
                         lr_scheduler_type="constant", per_device_train_batch_size=spec["batch"],
                         gradient_accumulation_steps=1, max_steps=spec["steps"], save_steps=10**6, logging_steps=1,
                         rlhf_type="dpo", dpo=DpoConfig(beta=BETA, loss_type=["sigmoid"]),
                         dataset_shuffle=False,  # file order, as TRL's sequential sampler: the same pairs a step
                         **OPTIM)
    times, cpu, tokens = [], [], []
    last_cpu = [0.0]

    def report(event: str, **fields: object) -> None:
        now = time.process_time()
        if event == "progress":
            times.append(float(fields["seconds"]))
            cpu.append(now - last_cpu[0])
            tokens.append(int(fields["tokens"]))
        last_cpu[0] = now  # "started", then each step: the span a step's wall time covers

    training.train(config, report)
    return summarise(times, cpu, tokens, spec["warmup"])


def worker_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset, load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    args = DPOConfig(output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=BATCH,
                     gradient_accumulation_steps=1, lr_scheduler_type="constant", beta=BETA, loss_type=["sigmoid"],
                     max_length=None, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, bf16=False, fp16=False, gradient_checkpointing=False,
                     train_sampling_strategy="sequential", **OPTIM)
    # DPOTrainer tokenizes texts itself; it is built on one text pair, then trains on the very
    # token ids our trainer reads (its own columns: prompt_ids, chosen_ids, rejected_ids)
    text = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}],
                               "chosen": [{"role": "assistant", "content": "Hello."}],
                               "rejected": [{"role": "assistant", "content": "No."}]}])
    trainer = DPOTrainer(model=model, args=args, train_dataset=text, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    trainer.train_dataset = load_dataset("json", data_files=spec["trl_rows"], split="train")
    seen: list[int] = []
    training_step = trainer.training_step

    def counting(model_, inputs, *rest, **kwargs):
        seen.append(int(inputs["attention_mask"].sum()))
        return training_step(model_, inputs, *rest, **kwargs)

    trainer.training_step = counting
    times, cpu, tokens = [], [], []

    class Clock(TrainerCallback):
        last = last_cpu = None

        def on_train_begin(self, *_args, **_kwargs):
            Clock.last, Clock.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *_args, **_kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            times.append(now - Clock.last)
            cpu.append(now_cpu - Clock.last_cpu)
            Clock.last, Clock.last_cpu = now, now_cpu
            tokens.append(sum(seen))
            seen.clear()

    trainer.add_callback(Clock())
    trainer.train()
    return summarise(times, cpu, tokens, spec["warmup"])


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--worker", choices=["ours", "trl", "ours-packed"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        result = worker_trl(spec) if args.worker == "trl" else worker_ours(spec)
        print("RESULT=" + json.dumps(result), flush=True)
        return 0

    from libs.common.server import create_server
    from services.dataprep.servicer import DataprepServicer, register

    servicer = DataprepServicer()
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    address = f"127.0.0.1:{port}"
    kinds = ["ours", "trl", "ours-packed"]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
            root = pathlib.Path(tmp)
            params = fixtures.random_llama(root / "model", MODEL_SHAPE)
            write_pairs(root / "pairs.jsonl", args.rows)
            plain = prepare(address, root / "model", root / "pairs.jsonl", root / "plain", packing=False)
            packed = prepare(address, root / "model", root / "pairs.jsonl", root / "packed", packing=True)
            pairs = pairs_for_trl(address, root / "plain", root / "trl_rows.jsonl")
            print(f"model: random-init Llama, {params / 1e6:.1f}M parameters, hidden {MODEL_SHAPE['hidden_size']} x "
                  f"{MODEL_SHAPE['num_hidden_layers']} layers; data: {pairs} pairs, {plain.get('tokens', '?')} tokens; "
                  f"packed into {packed.get('packing', {}).get('bins', '?')} rows of <= {MAX_LENGTH} tokens "
                  f"(efficiency {packed.get('packing', {}).get('efficiency', '?')}); batch {BATCH} pairs "
                  f"(packed: {PACKED_BATCH} row), {args.steps} steps ({args.warmup} warm-up), {args.threads} threads",
                  file=sys.stderr)
            results: dict[str, list[dict]] = {kind: [] for kind in kinds}
            for round_ in range(args.rounds):
                for kind in (kinds if round_ % 2 == 0 else kinds[::-1]):  # both orders
                    spec = {"model": str(root / "model"), "dataprep": address, "trl_rows": str(root / "trl_rows.jsonl"),
                            "dataset": str(root / ("packed" if kind == "ours-packed" else "plain")),
                            "batch": PACKED_BATCH if kind == "ours-packed" else BATCH,
                            "output_dir": str(root / f"{kind}-{round_}"), "steps": args.steps, "warmup": args.warmup,
                            "threads": args.threads}
                    result = run_worker(kind, spec)
                    results[kind].append(result)
                    print(f"round {round_ + 1} {kind}: {result['tokens_per_second']:.0f} tokens/s, median step "
                          f"{result['median_step_tokens_per_second']:.0f} tokens/s, "
                          f"{result['tokens_per_cpu_second']:.0f} tokens/CPU-s, step tokens {result['step_tokens']}, "
                          f"peak RSS {result['peak_rss_mib']:.0f} MiB, load average {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
    finally:
        servicer.shutdown(1)
        server.stop(1).wait()

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    rows = (("tokens/s, median step", "median_step_tokens_per_second", ".0f"),
            ("tokens/s, aggregate", "tokens_per_second", ".0f"),
            ("tokens per CPU second", "tokens_per_cpu_second", ".0f"),
            ("peak RSS MiB", "peak_rss_mib", ".0f"))
    print(f"{'case':<48} {'baseline (TRL DPOTrainer)':>26} {'ours':>10} {'ratio':>8}")
    for kind, label in (("ours", "unpacked"), ("ours-packed", "packed (TRL padded)")):
        for name, key, fmt in rows:
            theirs, ours = median("trl", key), median(kind, key)
            print(f"{name + ', ' + label:<48} {theirs:>26{fmt}} {ours:>10{fmt}} {ours / theirs:>7.2f}x")
    for key, what in (("median_step_tokens_per_second", "median step"), ("tokens_per_cpu_second", "CPU time")):
        print(f"packing's gain over ours unpacked ({what}): {median('ours-packed', key) / median('ours', key):.2f}x")
    for key, what in (("median_step_tokens_per_second", "wall, median step"), ("tokens_per_cpu_second", "CPU time")):
        ratio = median("ours", key) / median("trl", key)
        print(f"target: unpacked tokens/s ratio ({what}) >= 1.20: {ratio:.2f}x ({'met' if ratio >= 1.2 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
