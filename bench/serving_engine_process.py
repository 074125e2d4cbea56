"""Serving throughput on CPU with vLLM's model runner in the engine-core process
(VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's "uni" executor, what docs/serving.md advises for a
rollout server sharing its cores with a trainer) against vLLM's CPU default
(VLLM_ENABLE_V1_MULTIPROCESSING=1: a worker process of its own, bound to the cores vLLM picks,
fed through a shared-memory queue whose readers spin for a second after each message), on the
product's own server.

The same `tuneforge serve serving` process (default model, serving's default flags), one at a
time, the order reversed every round; per round a warm-up, then REQUESTS chat completions
(greedy, max_tokens) at CONCURRENCY through the official `openai` client. Printed per mode:
generated tokens/s (median round), generated tokens per CPU second of the serving process and
its children (what the engine costs the machine, spinning included; on a shared machine it
moves much less with other load than wall time does), the CPU the tree burns while idle for
IDLE seconds right after a batch (the spin), and the shutdown time (SIGTERM to exit).

    .venv/bin/python bench/serving_engine_process.py [--rounds 3] [--requests 32] [--concurrency 8] [--max_tokens 64]
        [--threads N]

--threads N: both modes with OMP_NUM_THREADS=N and VLLM_CPU_OMP_THREADS_BIND=nobind (the same
thread pool); unset, each mode as vLLM sets it up (in-core: torch's default pool, unbound).
Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import signal
import statistics
import sys
import tempfile
import time

QUESTIONS = ["who are you?", "what is a cat?", "tell me about the sea", "how do birds fly?",
             "name a colour", "what is two plus two?", "describe the sun", "where do fish live?",
             "why is the sky blue?", "what is rain?", "say hello", "what is a tree?"]
MODES = {"in-core": "0", "worker process": "1"}  # VLLM_ENABLE_V1_MULTIPROCESSING


def tree_cpu(pid: int) -> float:
    import psutil  # a dependency of vLLM

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def batch(url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> int:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with gate:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=max_tokens, temperature=0.0)
            return reply.usage.completion_tokens

    try:
        return sum(await asyncio.gather(*(one(i) for i in range(requests))))
    finally:
        await client.close()


def run_mode(stack, args) -> dict:
    import httpx

    started = time.perf_counter()
    serving = stack.start_serving(timeout=600)
    start_seconds = time.perf_counter() - started
    pid, url = serving.popen.pid, f"http://127.0.0.1:{serving.ready['http_port']}"
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    asyncio.run(batch(url, model, args.concurrency, args.concurrency, args.max_tokens))  # warm-up
    cpu0, wall0 = tree_cpu(pid), time.perf_counter()
    tokens = asyncio.run(batch(url, model, args.requests, args.concurrency, args.max_tokens))
    wall, cpu = time.perf_counter() - wall0, tree_cpu(pid) - cpu0
    idle0 = tree_cpu(pid)
    time.sleep(args.idle)
    idle = tree_cpu(pid) - idle0
    process = stack.processes.pop("serving")
    stopped = time.perf_counter()
    process.popen.send_signal(signal.SIGTERM)
    process.popen.wait(timeout=120)
    stop_seconds = time.perf_counter() - stopped
    log = process.log_path.read_text(errors="replace")
    return {"tokens_per_second": tokens / wall, "tokens_per_cpu_second": tokens / cpu, "idle_cpu": idle,
            "stop_seconds": stop_seconds, "start_seconds": start_seconds, "tokens": tokens,
            "force_killed": "force killing" in log, "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of both modes (unbound); unset: vLLM's own")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds idle after the batch, CPU counted")
    args = parser.parse_args()

    from cli.stack import Stack

    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-engine-process-") as tmp:
        for round_ in range(args.rounds):
            for mode in (list(MODES) if round_ % 2 == 0 else list(MODES)[::-1]):
                logs = pathlib.Path(tmp) / f"{round_}-{mode.replace(' ', '-')}"
                env = {"VLLM_ENABLE_V1_MULTIPROCESSING": MODES[mode]}
                if args.threads:
                    env.update(OMP_NUM_THREADS=str(args.threads), VLLM_CPU_OMP_THREADS_BIND="nobind")
                stack = Stack(logs, env=env)
                try:
                    result = run_mode(stack, args)
                finally:
                    stack.stop()
                results[mode].append(result)
                print(f"round {round_ + 1} {mode}: {result}", file=sys.stderr)
    print(f"{'':<34}" + "".join(f"{mode:>18}" for mode in MODES))
    for key, label in (("tokens_per_second", "generated tokens/s"), ("tokens_per_cpu_second", "tokens per CPU second"),
                       ("idle_cpu", f"CPU s in {args.idle:g} s idle after"), ("stop_seconds", "shutdown s"),
                       ("load", "load average")):
        print(f"{label:<34}" + "".join(f"{statistics.median(r[key] for r in results[m]):>18.2f}" for m in MODES))
    print(f"{'force-killed engine at shutdown':<34}" + "".join(
        f"{sum(r['force_killed'] for r in results[m]):>15}/{len(results[m])}" for m in MODES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
