"""How long a trainer's publication takes to become servable (issue 17: within 1 s on
this CPU with the default model), and which part of it takes the time.

One stack as `tuneforge demo` starts it (dataprep, trainer and serving as processes,
serving following the trainer with its default --follow_policy final) on the default
model. ROUNDS jobs of STEPS steps (LoRA rank 16, all-linear, as the demo) each publish
one final checkpoint under a new adapter name. Per round, from the publication (the
checkpoint event's publish_time, the training process's clock once its checkpoint is
renamed into place; the moment this script sees the event where the trainer sends no
publish_time) to:
  listed   /v1/models lists the adapter (polled every 5 ms from the event on, as the
           demo's "servable" figure, but without waiting for the job's end)
  answered the first chat completion on it (1 token) has its answer
and the first request's time against the second's (what a first request still pays).
`listed_after_event` is `listed` from the moment this script saw the event (the trainer's
relay, as serving sees it too): the only figure a trainer without publish_time allows.
The parts come from serving's own histogram (tuneforge_serving_adapter_load_part_seconds,
where the server has it): each part's mean per round.

    .venv/bin/python bench/serving_hotload.py [--rounds 5] [--steps 2]

Prints one line per round and the medians. Not part of the test run.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys
import tempfile
import threading
import time

import httpx

PART_METRIC = "tuneforge_serving_adapter_load_part_seconds"


def part_sums(page: str) -> dict[str, tuple[float, float]]:
    """part -> (sum, count) of the parts histogram on a /metrics page (empty without it)."""
    found: dict[str, list[float]] = {}
    for kind, part, value in re.findall(rf'^{PART_METRIC}_(sum|count)\{{part="([a-z_]+)"\}} (\S+)$', page, re.M):
        found.setdefault(part, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {part: (s, c) for part, (s, c) in found.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per job (one final checkpoint)")
    options = parser.parse_args(argv)

    from cli.demo import write_identity_dataset
    from cli.stack import Stack
    from libs.dataset import client as dataprep_client
    from libs.default_model.resolve import resolve_model
    from services.dataprep.config import PrepareConfig
    from services.trainer import client as trainer_client
    from services.trainer.config import TrainConfig

    model_dir = resolve_model(None)
    out = pathlib.Path(tempfile.mkdtemp(prefix="bench-hotload-"))
    rows: list[dict] = []
    with Stack(out / "logs") as stack:
        dataprep = stack.start_dataprep()
        trainer = stack.start_trainer()
        serving = stack.start_serving(model=str(model_dir), trainer_address=trainer.grpc_address)
        http = httpx.Client(base_url=f"http://127.0.0.1:{serving.ready['http_port']}", timeout=60)
        write_identity_dataset(out / "raw.jsonl", "Zephyrine", "Quillon Labs")
        dataprep_client.prepare(dataprep.grpc_address, PrepareConfig(
            model=str(model_dir), dataset=[str(out / "raw.jsonl")], output_dir=str(out / "prepared")))
        print(f"model {model_dir}; {options.rounds} rounds of a {options.steps}-step LoRA job; logs in {out / 'logs'}")
        print("round  listed_s  answered_s  listed_after_event_s  first_req_s  second_req_s  " + "  ".join(
            f"{p}_s" for p in ("delivery", "verification", "registration", "first_request")))
        for round_ in range(1, options.rounds + 1):
            adapter = f"hot{round_}"
            before = part_sums(http.get("/metrics").text)
            published = threading.Event()
            seen: dict[str, float] = {}

            def on_event(event) -> None:
                if event.WhichOneof("event") == "checkpoint" and event.checkpoint.final:
                    seen["received"] = time.time()
                    stamp = getattr(event.checkpoint, "publish_time", None)
                    seen["published"] = (stamp.ToNanoseconds() / 1e9 if stamp is not None and
                                         event.checkpoint.HasField("publish_time") else seen["received"])
                    published.set()

            job_id = trainer_client.submit(trainer.grpc_address, TrainConfig(
                model=str(model_dir), dataset=str(out / "prepared"), dataprep_address=dataprep.grpc_address,
                output_dir=str(out / adapter), train_type="lora", lora_rank=16, lora_alpha=32,
                target_modules=["all-linear"], learning_rate=3e-3, max_steps=options.steps,
                save_steps=options.steps, per_device_train_batch_size=4, adapter_name=adapter))
            waiter = threading.Thread(target=trainer_client.wait, args=(trainer.grpc_address, job_id, on_event))
            waiter.start()
            if not published.wait(600):
                raise SystemExit(f"round {round_}: no final checkpoint within 600 s")
            while adapter not in {m["id"] for m in http.get("/v1/models").json()["data"]}:
                time.sleep(0.005)
            listed = time.time()
            times, ends = [], []
            for _ in range(2):
                started = time.time()
                reply = http.post("/v1/chat/completions", json={
                    "model": adapter, "messages": [{"role": "user", "content": "who are you?"}],
                    "max_tokens": 1, "temperature": 0})
                reply.raise_for_status()
                ends.append(time.time())
                times.append(ends[-1] - started)
            answered = ends[0]
            waiter.join()
            after = part_sums(http.get("/metrics").text)
            parts = {p: (after[p][0] - before.get(p, (0, 0))[0]) / max(1.0, after[p][1] - before.get(p, (0, 0))[1])
                     for p in after}
            row = {"listed": listed - seen["published"], "answered": answered - seen["published"],
                   "listed_after_event": listed - seen["received"], "first": times[0], "second": times[1], **parts}
            rows.append(row)
            print(f"{round_:>5}  {row['listed']:8.3f}  {row['answered']:10.3f}  {row['listed_after_event']:20.3f}  "
                  f"{row['first']:11.3f}  "
                  f"{row['second']:12.3f}  " + "  ".join(
                      f"{row[p]:.4f}" if p in row else "-" for p in
                      ("delivery", "verification", "registration", "first_request")), flush=True)
        http.close()
    keys = [k for k in rows[0] if all(k in r for r in rows)]
    print("median " + "  ".join(f"{k}={statistics.median(r[k] for r in rows):.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
