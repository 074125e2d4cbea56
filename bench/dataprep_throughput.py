"""Rows/s of `tuneforge prepare` against the usual Hugging Face baseline, `datasets.map`
with `tokenizer.apply_chat_template` plus label masking, on the same synthetic rows with the
same tokenizer (the embedded default model's) and chat template (the built-in `qwen`, which
renders tools), at 1 and 2 processes, in one run; checks that both give the same input_ids
for every row; and the floor under both: the fast tokenizer alone encoding the same rendered
texts on the same number of cores (one `encode` per text on one thread; its Rust
`encode_batch` on a pool of max(--procs) threads: RAYON_NUM_THREADS is set before the pool
starts). `--num_proc N` means N cores for both: each of our processes tokenizes on one
thread, and the baseline's apply_chat_template encodes one text per call.

The rows (seeded) are a mix of shapes and lengths, from the default model's corpus:
  - chat (70%): 1-3 rounds, a system prompt in 30%, questions of 1-2 sentences, answers of
    1-4 sentences;
  - long (10%): one question, an answer of 8-20 sentences;
  - tools (20%): a `tools` list (1-3 function schemas, as JSON text like most hubs store it),
    the user's question, an assistant turn with 1-2 OpenAI `tool_calls` (arguments as JSON
    text), their `tool` responses, the answer, and in half of them a further plain round.

The baseline's masking is the common recipe (open-instruct, many SFT scripts): tokenize the
whole conversation with apply_chat_template (tools included), then for each assistant turn
tokenize the prefix before it (with the generation prompt) and through it to find where its
tokens start and end; it parses `tools` and the calls' `arguments` JSON as the template needs
(our reader does the same). Its time covers load_dataset("json") and map (no cache, kept in
memory); ours covers `tuneforge prepare` end to end in this process (read JSONL, decode,
render, tokenize, mask, write Arrow shards and the manifest), each run into a fresh output
directory so the shard cache is not used. Rounds alternate the order (baseline first, then
ours first); each figure is printed with the 1-minute load average (`uptime`) it ran under,
and the ratio of each round (ours/baseline in the same round) besides the medians: on a
shared machine the ratio is what to compare. Each run's CPU time is printed too (this
process's and that of the processes under it), and the summary gives rows per CPU-second
(what a core does, less moved by the machine's other work than wall time) and a CPU-time
bound on the scaling to N idle cores; the wall-time scaling needs idle cores.

    .venv/bin/python bench/dataprep_throughput.py [--rows 20000] [--rounds 3] [--procs 1 2]

Target (issue 18): ours >= 3x the baseline's rows/s at 1 process, and 2 processes >= 1.8x
ours at 1. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import statistics
import tempfile
import threading
import time

import pyarrow as pa

TEMPLATE = "qwen"  # built-in: ChatML with tools and tool_calls (the default model's own renders no tools)
SYSTEMS = ["You are a concise tutor.", "You are a helpful assistant. Answer in plain words.",
           "You explain computers to beginners. Keep answers short and use examples where they help.",
           "Answer as a careful teacher would: first the idea, then one example."]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search_docs", "description": "Search the documentation.",
     "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                    "limit": {"type": "integer"}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "run_python", "description": "Run a short Python snippet.",
     "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}},
    {"type": "function", "function": {"name": "convert_units", "description": "Convert a value between units.",
     "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from": {"type": "string"},
                    "to": {"type": "string"}}, "required": ["value", "from", "to"]}}},
    {"type": "function", "function": {"name": "lookup_word", "description": "A word's definition.",
     "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}},
]
CITIES = ["Rome", "Paris", "Oslo", "Lima", "Cairo", "Seoul", "Quito", "Perth"]


def _sentences() -> list[str]:
    from libs.default_model import corpus

    return [s for paragraph in corpus.paragraphs() for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]


def _arguments(rng: random.Random, name: str, say) -> dict:
    if name == "get_weather":
        return {"city": rng.choice(CITIES), "unit": rng.choice(["celsius", "fahrenheit"])}
    if name == "search_docs":
        return {"query": " ".join(say(1).split()[:rng.randint(2, 6)]), "limit": rng.randint(1, 10)}
    if name == "run_python":
        return {"code": f"print(sum(range({rng.randint(2, 999)})))"}
    if name == "convert_units":
        return {"value": round(rng.uniform(0, 500), 2), "from": "km", "to": "mi"}
    return {"word": rng.choice(say(1).split()).strip(".,")}


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of the mix above (seeded)."""
    rng = random.Random(seed)
    sentences = _sentences()

    def say(low: int, high: int | None = None) -> str:
        return " ".join(rng.choice(sentences) for _ in range(rng.randint(low, high or low)))

    rows = []
    for _ in range(n):
        shape = rng.random()
        if shape < 0.7:
            messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": say(1, 2)}, {"role": "assistant", "content": say(1, 4)}]
            rows.append({"messages": messages})
        elif shape < 0.8:
            rows.append({"messages": [{"role": "user", "content": say(1, 2)},
                                      {"role": "assistant", "content": say(8, 20)}]})
        else:
            tools = rng.sample(TOOLS, rng.randint(1, 3))
            calls = [{"type": "function", "function": {"name": (name := rng.choice(tools)["function"]["name"]),
                                                       "arguments": json.dumps(_arguments(rng, name, say))}}
                     for _ in range(rng.randint(1, 2))]
            messages = [{"role": "user", "content": say(1, 2)},
                        {"role": "assistant", "content": "", "tool_calls": calls}]
            messages += [{"role": "tool", "content": json.dumps({"result": say(1)})} for _ in calls]
            messages.append({"role": "assistant", "content": say(1, 3)})
            if rng.random() < 0.5:
                messages += [{"role": "user", "content": say(1)}, {"role": "assistant", "content": say(1, 4)}]
            rows.append({"messages": messages, "tools": json.dumps(tools)})
    return rows


_TOKENIZER = None


def _message(message: dict) -> dict:
    """A message as the template takes it: the columns other rows have (null here) dropped,
    a call's `arguments` JSON text parsed (Qwen2.5 writes `arguments | tojson`)."""
    message = {k: v for k, v in message.items() if v is not None}
    if "tool_calls" in message:
        message["tool_calls"] = [{**call, "function": {**call["function"],
                                                       "arguments": json.loads(call["function"]["arguments"])}}
                                 for call in message["tool_calls"]]
    return message


def _ids(messages, tools, add_generation_prompt=False) -> list[int]:
    result = _TOKENIZER.apply_chat_template(messages, tools=tools, tokenize=True,
                                            add_generation_prompt=add_generation_prompt)
    return list(result["input_ids"] if not isinstance(result, list) else result)


def baseline_map(example: dict) -> dict:
    """apply_chat_template + label masking by prefix tokenization, per row."""
    tools = json.loads(example["tools"]) if example.get("tools") else None
    messages = [_message(m) for m in example["messages"]]
    input_ids = _ids(messages, tools)
    labels = [-100] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(messages[:i], tools, add_generation_prompt=True))
        end = len(_ids(messages[:i + 1], tools))
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels}


def _tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    from services.dataprep import templates

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = templates.load(TEMPLATE)
    return tokenizer


def run_baseline(data: pathlib.Path, num_proc: int, model_dir: str) -> tuple[float, float, list[list[int]]]:
    """Wall and CPU seconds (this process's: all of it at num_proc 1) and the input_ids."""
    global _TOKENIZER
    import datasets

    datasets.disable_caching()
    _TOKENIZER = _tokenizer(model_dir)
    started, cpu = time.perf_counter(), time.process_time()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", keep_in_memory=True)
    mapped = dataset.map(baseline_map, num_proc=num_proc if num_proc > 1 else None,
                         remove_columns=dataset.column_names, keep_in_memory=True,
                         desc=f"baseline map, num_proc {num_proc}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return seconds, cpu, mapped["input_ids"]


def run_ours(data: pathlib.Path, num_proc: int, out: pathlib.Path) -> tuple[float, float, list[list[int]], dict]:
    """Wall and CPU seconds (this process's: all of it at num_proc 1), the input_ids, the manifest."""
    from services.dataprep import cli

    started, cpu = time.perf_counter(), time.process_time()
    assert cli.main(["--dataset", str(data), "--output_dir", str(out), "--num_proc", str(num_proc),
                     "--template", TEMPLATE, "--max_length", "0", "--shard_rows", "5000"]) == 0
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    manifest = json.loads((out / "manifest.json").read_text())
    ids = []
    for shard in manifest["shards"]:
        ids += pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().column("input_ids").to_pylist()
    return seconds, cpu, ids, manifest


def rendered(rows: list[dict], model_dir: str) -> tuple[object, list[str]]:
    """The rows' texts, rendered by the chat template (not timed), and the backend tokenizer."""
    tokenizer = _tokenizer(model_dir)
    texts = [tokenizer.apply_chat_template([_message(m) for m in row["messages"]], tokenize=False,
                                           tools=json.loads(row["tools"]) if row.get("tools") else None)
             for row in rows]
    backend = tokenizer.backend_tokenizer
    backend.encode_batch(texts[:256], add_special_tokens=False)  # the thread pool starts
    return backend, texts


def tokenizer_only(backend, texts: list[str]) -> tuple[float, float, float]:
    """Seconds the fast tokenizer alone takes on the rendered texts: encode_batch (Rust, on
    its pool's threads), and encode one text at a time (one thread), and the CPU seconds of
    the latter. The floor under any path that tokenizes each row once, on as many cores."""
    started = time.perf_counter()
    backend.encode_batch(texts, add_special_tokens=False)
    batch = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    for text in texts:
        backend.encode(text, add_special_tokens=False)
    return batch, time.perf_counter() - started, time.process_time() - cpu


class ChildCpu:
    """CPU seconds of the processes under this one (worker pools, our fork server's workers)
    while the block runs: /proc polled every 0.2 s, the last value seen of each process kept
    (a process's last 0.2 s before it exits can be missed; a process is found through its
    parent's main thread, which starts both sides' workers)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.start, self.seen, self.done = self._poll(), {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.seconds = sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())

    def _run(self) -> None:
        while not self.done.wait(0.2):
            self.seen.update(self._poll())
        self.seen.update(self._poll())

    def _poll(self) -> dict[int, float]:
        found, todo = {}, [os.getpid()]
        while todo:
            pid = todo.pop()
            try:
                todo += [int(child) for child in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                if pid != os.getpid():
                    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
                    fields = stat[stat.rindex(")") + 2:].split()  # state ppid ... utime stime (fields 14, 15)
                    found[pid] = (int(fields[11]) + int(fields[12])) / self.TICK
            except (FileNotFoundError, ProcessLookupError, ValueError):
                continue  # it ended meanwhile
        return found


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per process count, alternating the order")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    pool = max(args.procs)
    os.environ["RAYON_NUM_THREADS"] = str(pool)  # encode_batch's floor on as many cores as the most processes

    from libs.default_model.resolve import resolve_model

    model_dir = str(resolve_model(None))
    work = pathlib.Path(tempfile.mkdtemp(prefix="dataprep-bench-"))
    data = work / "rows.jsonl"
    rows = synthetic_rows(args.rows)
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokens = None

    # warm up both paths on a few rows at each process count (imports, tokenizer load, the default
    # model's cache, our --num_proc fork server, which a long-running dataprep service keeps)
    small = work / "small.jsonl"
    small.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(300, seed=1)))
    for num_proc in args.procs:
        run_baseline(small, num_proc, model_dir)
        run_ours(small, num_proc, work / f"warm-{num_proc}")

    backend, texts = rendered(rows, model_dir)
    batches, singles, single_cpus = [], [], []  # the floor, timed in every round beside the two paths
    medians = {}
    for num_proc in args.procs:
        theirs, ours, ratios, cpu = [], [], [], {"baseline": [], "ours": []}
        for round_ in range(args.rounds):
            order = ("baseline", "ours", "floor") if round_ % 2 == 0 else ("floor", "ours", "baseline")
            timed = {}
            for who in order:
                if who == "floor":
                    before = load()
                    batch, single, single_cpu = tokenizer_only(backend, texts)
                    batches.append(batch)
                    singles.append(single)
                    single_cpus.append(single_cpu)
                    print(f"num_proc {num_proc} round {round_ + 1} tokenizer alone: encode_batch "
                          f"{args.rows / batch:.0f} rows/s ({pool} threads), encode one by one "
                          f"{args.rows / single:.0f} rows/s (1 thread); load {before:.1f} -> {load():.1f}", flush=True)
                    continue
                before = load()
                with ChildCpu() as children:
                    if who == "baseline":
                        seconds, own, base_ids = run_baseline(data, num_proc, model_dir)
                    else:
                        seconds, own, our_ids, manifest = run_ours(data, num_proc, work / f"out-{num_proc}-{round_}")
                        assert manifest["rows_out"] == args.rows, manifest["rejected_by_reason"]
                        tokens = manifest["tokens"]
                timed[who] = seconds
                cpu[who].append((own, children.seconds))
                print(f"num_proc {num_proc} round {round_ + 1} {who:<8} {args.rows / seconds:7.0f} rows/s "
                      f"({seconds:6.1f} s; CPU s: this process {own:.1f}, under it {children.seconds:.1f}; "
                      f"load {before:.1f} -> {load():.1f})", flush=True)
            same = sum(a == b for a, b in zip(base_ids, our_ids))
            assert same == len(base_ids) == len(our_ids), f"input_ids differ on {args.rows - same} rows"
            theirs.append(timed["baseline"])
            ours.append(timed["ours"])
            ratios.append(timed["baseline"] / timed["ours"])
        # CPU seconds per row: all processes, and this one alone (ours: the process that reads, packs, writes)
        medians[num_proc] = (args.rows / statistics.median(theirs), args.rows / statistics.median(ours), ratios,
                             {who: (statistics.median(own + under for own, under in seconds) / args.rows,
                                    statistics.median(own for own, _ in seconds) / args.rows)
                              for who, seconds in cpu.items()})
    batch, single = statistics.median(batches), statistics.median(singles)
    floor = {1: single, pool: batch}  # the tokenizer alone on N cores

    print(f"\n{args.rows} synthetic rows (70% chat 1-3 rounds, 10% long answers, 20% tools; {tokens} tokens), "
          f"template {TEMPLATE}, default model tokenizer; median of {args.rounds} alternating rounds; "
          "input_ids identical on every row")
    print("baseline: HF datasets.map + apply_chat_template (tools) + prefix label masking, same process count")
    print(f"tokenizer alone: encode_batch on {pool} threads {args.rows / batch:.0f} rows/s, one encode per text "
          f"on 1 thread {args.rows / single:.0f} rows/s")
    print(f"{'case':<12}{'baseline rows/s':>17}{'ours rows/s':>13}{'ratio':>8}{'per round':>24}"
          f"{'ours/tokenizer alone, same cores':>34}")
    for num_proc, (base, mine, ratios, _) in medians.items():
        alone = f"{mine * floor[num_proc] / args.rows:.2f}" if num_proc in floor else "-"
        print(f"{f'num_proc {num_proc}':<12}{base:>17.0f}{mine:>13.0f}{mine / base:>8.2f}"
              f"{' '.join(f'{r:.2f}' for r in ratios):>24}{alone:>34}")
    alone_cpu = args.rows / statistics.median(single_cpus)
    print("rows per CPU-second (all processes' CPU time: what a core does, whatever else the machine runs); "
          f"the tokenizer alone, one encode per text: {alone_cpu:.0f}")
    for num_proc, (_, _, _, on_cpu) in medians.items():
        base, mine = 1 / on_cpu["baseline"][0], 1 / on_cpu["ours"][0]
        print(f"  num_proc {num_proc}: baseline {base:.0f}, ours {mine:.0f}, ratio {mine / base:.2f}, "
              f"ours / tokenizer alone {mine / alone_cpu:.2f}")
    if 1 in medians:
        for num_proc in sorted(medians.keys() - {1}):
            print(f"scaling, wall time: ours num_proc {num_proc} / num_proc 1 = "
                  f"{medians[num_proc][1] / medians[1][1]:.2f}; baseline {medians[num_proc][0] / medians[1][0]:.2f}")
            # on N idle cores: all N busy (N / CPU per row), and no faster than the one serial process
            one, (total, serial) = medians[1][3]["ours"][0], medians[num_proc][3]["ours"]
            print(f"scaling, CPU-time bound on {num_proc} idle cores: ours "
                  f"{min(num_proc * one / total, one / serial):.2f} (CPU per row {total / one:.2f}x of num_proc 1's; "
                  f"the main process {serial / total:.0%} of it)")


if __name__ == "__main__":
    main()
