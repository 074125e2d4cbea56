"""What `tuneforge deploy` costs over vLLM's own OpenAI server, and what mixed
multi-adapter traffic costs over base-only traffic.

One run on this machine: the same engine settings (default model, LoRA on,
max_loras 4, max_lora_rank 16, float32, stats logging off), the same four random
LoRA adapters and the same prompts, greedy, streamed. Both servers run at once
and take turns round by round (this machine is shared: load from elsewhere then
falls on both alike). Per case: warm-up, then ROUNDS rounds of REQUESTS
requests at CONCURRENCY; generated tokens/s is the median round's, TTFT the
median over all requests.

    .venv/bin/python bench/serving_overhead.py [--rounds 6] [--requests 32] [--concurrency 8] [--max_tokens 48]

Targets: overhead <= 5% in throughput and <= 10 ms in TTFT. Not part of the test run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

QUESTIONS = ["who are you?", "what is a cat?", "tell me about the sea", "how do birds fly?",
             "name a colour", "what is two plus two?", "describe the sun", "where do fish live?",
             "why is the sky blue?", "what is rain?", "say hello", "what is a tree?",
             "who wrote this?", "what day is it?", "count to five", "what is music?"]
ADAPTERS = [f"lora{i}" for i in range(1, 5)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_adapters(model_dir: pathlib.Path, root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Four rank-8 LoRAs with random B (so each changes the answers), published with args.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from libs.common import checkpoint

    paths = {}
    for seed, name in enumerate(ADAPTERS, start=1):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)

        def fill(tmp: pathlib.Path, model=model) -> None:
            model.save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps({"model": str(model_dir), "lora_rank": 8}))

        paths[name] = checkpoint.publish(root / name / "checkpoint-1", fill)
    return paths


def ours(model_dir, adapters, port, ready_file) -> list[str]:
    return [sys.executable, "-m", "cli.main", "deploy", "--model", str(model_dir), "--served_model_name", "base",
            "--port", str(port), "--max_loras", "4", "--max_lora_rank", "16", "--torch_dtype", "float32",
            "--ready_file", str(ready_file), "--adapters", *[f"{n}={p}" for n, p in adapters.items()]]


def vllms(model_dir, adapters, port, ready_file) -> list[str]:
    # Our engine: AsyncEngineArgs defaults plus these; no generation_config defaults (ours passes none).
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
            "--max-loras", "4", "--max-lora-rank", "16", "--dtype", "float32", "--disable-log-stats",
            "--disable-uvicorn-access-log", "--generation-config", "vllm",
            "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]


@contextlib.contextmanager
def server(name: str, command: list[str], port: int, log_dir: pathlib.Path, timeout: float = 600.0):
    log = open(log_dir / f"{name}.log", "wb")
    popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = time.monotonic()
    try:
        while True:
            if popen.poll() is not None:
                raise SystemExit(f"{name} exited with {popen.returncode} while starting; see {log.name}")
            if time.monotonic() - started > timeout:
                raise SystemExit(f"{name} not ready in {timeout:.0f} s; see {log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"  {name} ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
        log.close()


async def one(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """One streamed chat request: (seconds to the first content chunk, completion tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url} {model}: HTTP {response.status_code}: {await response.aread()}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"{url} {model}: {chunk['error']}")
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - sent
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - sent), tokens


async def one_round(url: str, models: list[str], args, requests: int) -> tuple[float, list[float], int]:
    """`requests` requests at `args.concurrency`: (generated tokens/s, TTFTs, generated tokens)."""
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        gate = asyncio.Semaphore(args.concurrency)

        async def run(i: int):
            async with gate:
                return await one(client, url, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], args.max_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(requests)))
        seconds = time.perf_counter() - started
    tokens = sum(t for _, t in results)
    return tokens / seconds, [ttft for ttft, _ in results], tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=48)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from libs.default_model.resolve import resolve_model

    model_dir = resolve_model(None)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-serving-"))
    adapters = build_adapters(model_dir, work)
    cases = {"base": ["base"], "mixed": ADAPTERS}
    # Both servers up at once, rounds interleaved (ABBA...): other load on this shared
    # machine then falls on both alike instead of on whichever ran second.
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, build in (("vllm", vllms), ("tuneforge", ours)):
            port = free_port()
            urls[name] = stack.enter_context(server(name, build(model_dir, adapters, port, work / f"{name}.ready.json"),
                                                    port, work))
        for name, url in urls.items():
            for models in cases.values():  # warm-up: every model, caches, kernels
                asyncio.run(one_round(url, models, args, args.concurrency))
        samples = {(name, case): ([], [], 0) for name in urls for case in cases}
        for round_ in range(args.rounds):
            order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
            for case, models in cases.items():
                for name in order:
                    rate, ttfts, tokens = asyncio.run(one_round(urls[name], models, args, args.requests))
                    rates, all_ttfts, total = samples[name, case]
                    rates.append(rate)
                    all_ttfts.extend(ttfts)
                    samples[name, case] = (rates, all_ttfts, total + tokens)
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    results = {key: {"tok_s": statistics.median(rates), "ttft_ms": 1000 * statistics.median(ttfts), "tokens": total}
               for key, (rates, ttfts, total) in samples.items()}

    print(f"\n{args.rounds} rounds x {args.requests} streamed chat requests, concurrency {args.concurrency}, "
          f"max_tokens {args.max_tokens}, greedy; baseline: vLLM's own OpenAI server (same engine settings)")
    print(f"{'case':<34}{'baseline':>12}{'ours':>12}{'ratio':>9}")
    for case in cases:
        v, t = results["vllm", case], results["tuneforge", case]
        print(f"{case + ' throughput (gen tok/s)':<34}{v['tok_s']:>12.1f}{t['tok_s']:>12.1f}{t['tok_s'] / v['tok_s']:>9.3f}")
        print(f"{case + ' TTFT median (ms)':<34}{v['ttft_ms']:>12.1f}{t['ttft_ms']:>12.1f}{t['ttft_ms'] / v['ttft_ms']:>9.3f}"
              f"   (ours - baseline: {t['ttft_ms'] - v['ttft_ms']:+.1f} ms)")
        if v["tokens"] != t["tokens"]:
            print(f"  note: {case}: generated tokens differ (baseline {v['tokens']}, ours {t['tokens']})")
    for name in ("vllm", "tuneforge"):
        base, mixed = results[name, "base"], results[name, "mixed"]
        print(f"{name + ' mixed/base throughput':<34}{base['tok_s']:>12.1f}{mixed['tok_s']:>12.1f}"
              f"{mixed['tok_s'] / base['tok_s']:>9.3f}")
    base_t, base_v = results["tuneforge", "base"], results["vllm", "base"]
    ok = base_t["tok_s"] >= 0.95 * base_v["tok_s"] and base_t["ttft_ms"] - base_v["ttft_ms"] <= 10
    print(f"targets (base: throughput >= 0.95 x baseline, TTFT <= baseline + 10 ms): {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
