"""Rows/s of `tuneforge prepare` against the usual Hugging Face baseline, `datasets.map`
with `tokenizer.apply_chat_template` plus label masking, on the same synthetic multi-turn
rows with the same tokenizer (the embedded default model's), at 1 and 2 processes, in one
run; checks that both give the same input_ids for every row.

The baseline's masking is the common recipe (open-instruct, many SFT scripts): tokenize the
whole conversation with apply_chat_template, then for each assistant turn tokenize the
prefix before it (with the generation prompt) and through it to find where its tokens
start and end. Its time covers load_dataset("json") and map (no cache, kept in memory);
ours covers `tuneforge prepare` end to end in this process (read JSONL, tokenize, mask,
write Arrow shards and the manifest), each run into a fresh output directory so the
shard cache is not used.

    .venv/bin/python bench/dataprep_throughput.py [--rows 50000] [--repeats 1]

Target: ours >= 3x the baseline's rows/s at each process count. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import tempfile
import time

import pyarrow as pa

TOPICS = ["the weather", "a recipe for bread", "prime numbers", "the French revolution", "sorting algorithms",
          "a trip to Rome", "photosynthesis", "the stock market", "learning the violin", "black holes"]
WORDS = ("the of and to in is it that for on with as was at by be this from or have an are but not you all "
         "can had her one our out day get has him his how man new now old see two way who boy did its let put "
         "say she too use model data train token answer question value result system").split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of 1-3 rounds, some with a system prompt; answers 20-120 words."""
    rng = random.Random(seed)

    def words(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    rows = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are a concise tutor."}] if rng.random() < 0.3 else []
        for turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": f"Tell me about {rng.choice(TOPICS)} ({i}.{turn}): "
                                                        + words(5, 30)})
            messages.append({"role": "assistant", "content": words(20, 120) + "."})
        rows.append({"messages": messages})
    return rows


_TOKENIZER = None


def _ids(messages, add_generation_prompt=False) -> list[int]:
    result = _TOKENIZER.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(result["input_ids"] if not isinstance(result, list) else result)


def baseline_map(example: dict) -> dict:
    """apply_chat_template + label masking by prefix tokenization, per row."""
    messages = example["messages"]
    input_ids = _ids(messages)
    labels = [-100] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(messages[:i], add_generation_prompt=True))
        end = len(_ids(messages[:i + 1]))
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels}


def run_baseline(data: pathlib.Path, num_proc: int, model_dir: str) -> tuple[float, list[list[int]]]:
    global _TOKENIZER
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    _TOKENIZER = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(data), split="train", keep_in_memory=True)
    mapped = dataset.map(baseline_map, num_proc=num_proc if num_proc > 1 else None, remove_columns=["messages"],
                         keep_in_memory=True, desc=f"baseline map, num_proc {num_proc}")
    seconds = time.perf_counter() - started
    return seconds, mapped["input_ids"]


def run_ours(data: pathlib.Path, num_proc: int, out: pathlib.Path) -> tuple[float, list[list[int]], dict]:
    from services.dataprep import cli

    started = time.perf_counter()
    assert cli.main(["--dataset", str(data), "--output_dir", str(out), "--num_proc", str(num_proc),
                     "--max_length", "0", "--shard_rows", "5000"]) == 0
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    ids = []
    for shard in manifest["shards"]:
        ids += pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().column("input_ids").to_pylist()
    return seconds, ids, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from libs.default_model.resolve import resolve_model

    model_dir = str(resolve_model(None))
    work = pathlib.Path(tempfile.mkdtemp(prefix="dataprep-bench-"))
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(args.rows)))

    # warm up both paths on a few rows at each process count (imports, tokenizer load, the default
    # model's cache, our --num_proc fork server, which a long-running dataprep service keeps)
    small = work / "small.jsonl"
    small.write_text("".join(json.dumps(row) + "\n" for row in synthetic_rows(200, seed=1)))
    for num_proc in args.procs:
        run_baseline(small, num_proc, model_dir)
        run_ours(small, num_proc, work / f"warm-{num_proc}")

    table = []
    for num_proc in args.procs:
        theirs, ours = [], []
        for repeat in range(args.repeats):
            seconds, base_ids = run_baseline(data, num_proc, model_dir)
            theirs.append(seconds)
            seconds, our_ids, manifest = run_ours(data, num_proc, work / f"out-{num_proc}-{repeat}")
            ours.append(seconds)
            assert manifest["rows_out"] == args.rows, manifest["rejected_by_reason"]
            same = sum(a == b for a, b in zip(base_ids, our_ids))
            assert same == len(base_ids) == len(our_ids), f"input_ids differ on {args.rows - same} rows"
        table.append((num_proc, args.rows / statistics.median(theirs), args.rows / statistics.median(ours)))

    print(f"\n{args.rows} synthetic multi-turn rows, default model tokenizer, median of {args.repeats}; "
          "input_ids identical on every row")
    print(f"{'case':<16}{'baseline rows/s':>17}{'ours rows/s':>13}{'ratio':>8}")
    print("baseline: HF datasets.map + apply_chat_template + prefix label masking")
    for num_proc, base, mine in table:
        print(f"{f'num_proc {num_proc}':<16}{base:>17.0f}{mine:>13.0f}{mine / base:>8.2f}")


if __name__ == "__main__":
    main()
