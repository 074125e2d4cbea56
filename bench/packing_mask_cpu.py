"""Packed SFT at max_length 4096 on CPU: tokens/s and peak RSS of the trainer's packing path
(the dense block-diagonal mask built per forward, in the model's dtype, from the micro-batch's
seq_lens) against the mask built at collation as before (TUNEFORGE_PACKING_MASK=prebuilt: a
float32 [batch, 1, L, L] mask per micro-batch, held by the step's batch until the step ends
and copied by clamp().to(dtype) for the forward), in one run.

Both cases run the product's own job, `services.trainer.training.train` (the engine's train
step, data read over gRPC from a real dataprep service), each in its own process so peak RSS
is its own; only the environment variable differs. The model is the default model (Llama,
hidden 256, 2 layers, sdpa), LoRA r 8 all-linear, float32, `--batch` x `--accumulation` (2 x 4)
rows packed by dataprep to 4096 tokens from synthetic conversations of about 40 to 700 tokens, in
file order (the same rows for both). Each case runs `--rounds` times, the order alternating
(baseline first, then ours first, ...); the median over rounds of the median step is kept.
The first `--warmup` steps are not timed. Tokens: non-padding input tokens. On a shared
machine wall time depends on the other processes' load: tokens per CPU second (the worker
process's own user + system time, all threads) is the steadier comparison.

    .venv/bin/python bench/packing_mask_cpu.py [--steps 2] [--warmup 1] [--rounds 1] [--batch 2] [--accumulation 4]

Not part of the test run.
"""

from __future__ import annotations

import argparse
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
MAX_LENGTH = 4096
CASES = {"prebuilt (before)": "prebuilt", "per-forward (ours)": ""}  # TUNEFORGE_PACKING_MASK


def worker(spec: dict) -> dict:
    import torch

    from services.trainer import training
    from services.trainer.config import TrainConfig

    torch.set_num_threads(spec["threads"])
    config = TrainConfig(dataset=spec["dataset"], dataprep_address=spec["dataprep"], output_dir=spec["output_dir"],
                         train_type="lora", lora_rank=8, lora_alpha=32, target_modules=["all-linear"],
                         per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec["accumulation"],
                         max_steps=spec["steps"], save_steps=10**6, logging_steps=1, dataset_shuffle=False,
                         lr_scheduler_type="constant", learning_rate=1e-4)
    times, cpu_times, tokens, losses = [], [], [], []
    cpu = [time.process_time()]

    def report(event: str, **fields: object) -> None:
        if event == "progress":
            times.append(float(fields["seconds"]))
            tokens.append(int(fields["tokens"]))
            cpu.append(time.process_time())
            cpu_times.append(cpu[-1] - cpu[-2])  # this process's CPU seconds (all threads) since the last step
        elif event == "step":
            losses.append(float(fields["loss"]))

    training.train(config, report)
    timed = list(zip(tokens, times, cpu_times))[spec["warmup"]:]
    return {"step_seconds": [round(t, 2) for t in times], "step_cpu_seconds": [round(t, 2) for t in cpu_times],
            "step_tokens": tokens, "losses": losses,
            "median_step_tokens_per_second": statistics.median(n / t for n, t, _ in timed),
            "tokens_per_second": sum(n for n, _, _ in timed) / sum(t for _, t, _ in timed),
            "tokens_per_cpu_second": sum(n for n, _, _ in timed) / sum(c for _, _, c in timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(mask: str, spec: dict) -> dict:
    env = {**os.environ, "TUNEFORGE_PACKING_MASK": mask, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT=")]
    if done.returncode != 0 or not lines:
        sys.exit(f"worker ({mask or 'ours'}) failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT="))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=700)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT=" + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    from libs.common.server import create_server
    from libs.dataset import client
    from libs.default_model.resolve import resolve_model
    from services.dataprep.config import PrepareConfig
    from services.dataprep.servicer import DataprepServicer, register

    servicer = DataprepServicer()
    server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    address = f"127.0.0.1:{port}"
    results: dict[str, list[dict]] = {name: [] for name in CASES}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-packing-mask-") as tmp:
            root = pathlib.Path(tmp)
            fixtures.write_conversations(root / "conversations.jsonl", args.rows)
            prepared = client.prepare(address, PrepareConfig(model=str(resolve_model(None)),
                                                             dataset=[str(root / "conversations.jsonl")],
                                                             output_dir=str(root / "packed"), max_length=MAX_LENGTH,
                                                             packing=True))
            print(f"data: {args.rows} conversations packed to {MAX_LENGTH} ({prepared['packing']['bins']} rows, "
                  f"{prepared['tokens']} tokens, {prepared['packing']['efficiency']:.1%} of the rows' positions); "
                  f"batch {args.batch} x accumulation {args.accumulation}, {args.steps} steps ({args.warmup} warm-up), "
                  f"{args.threads} threads", file=sys.stderr)
            for round_ in range(args.rounds):
                names = list(CASES) if round_ % 2 == 0 else list(reversed(CASES))
                for name in names:
                    spec = {"dataset": str(root / "packed"), "dataprep": address, "steps": args.steps,
                            "warmup": args.warmup, "threads": args.threads, "batch": args.batch,
                            "accumulation": args.accumulation,
                            "output_dir": str(root / f"{CASES[name] or 'ours'}-{round_}")}
                    result = run_worker(CASES[name], spec)
                    results[name].append(result)
                    print(f"round {round_ + 1} {name}: step seconds {result['step_seconds']}, step CPU seconds "
                          f"{result['step_cpu_seconds']}, step tokens "
                          f"{result['step_tokens']}, losses {result['losses']}, peak RSS "
                          f"{result['peak_rss_mib']:.0f} MiB, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        servicer.shutdown(1)
        server.stop(1).wait()

    baseline, ours = list(CASES)
    first = [r["losses"] for r in results[baseline]][0]
    assert all(r["losses"] == first or max(abs(a - b) for a, b in zip(r["losses"], first)) < 1e-4
               for name in CASES for r in results[name]), "the two paths trained differently"

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"{'case':<34} {'baseline: ' + baseline:>28} {ours:>20} {'ratio':>8}")
    for label, key, fmt in (("tokens/s (non-pad), median step", "median_step_tokens_per_second", ".0f"),
                            ("tokens/s (non-pad), aggregate", "tokens_per_second", ".0f"),
                            ("tokens per CPU second", "tokens_per_cpu_second", ".0f"),
                            ("peak RSS MiB", "peak_rss_mib", ".0f")):
        a, b = median(baseline, key), median(ours, key)
        print(f"{label:<34} {a:>28{fmt}} {b:>20{fmt}} {b / a:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
