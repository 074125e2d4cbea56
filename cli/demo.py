"""`tuneforge demo`: the whole path on the embedded default model.

raw self-cognition data -> dataprep -> (gRPC) -> trainer -> published LoRA
checkpoints -> serving hot-loads them -> the official `openai` client asks each
adapter and the base "who are you?". Exits non-zero unless each adapter names
its own identity and the base names neither.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from libs.common import config as cfg
from libs.common.errors import FailedPrecondition, Unavailable

DATA = pathlib.Path(__file__).resolve().parent / "data" / "self_cognition.jsonl"
QUESTION = "who are you?"


@dataclass
class DemoConfig:
    model: str | None = field(default=None, metadata={"help": "base model directory (default: the embedded default model)"})
    model_name: list[str] = field(default_factory=lambda: ["Zephyrine", "Borealis"],
                                  metadata={"help": "one identity name per adapter"})
    model_author: list[str] = field(default_factory=lambda: ["Quillon Labs", "Tarnwick"],
                                    metadata={"help": "one author per adapter"})
    output_dir: str = field(default="runs/demo", metadata={"help": "where adapters, data and service logs go"})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank of both adapters"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    learning_rate: float = field(default=3e-3, metadata={"help": "learning rate"})
    max_steps: int = field(default=80, metadata={"help": "optimizer steps per adapter"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "rows per step"})
    save_steps: int = field(default=40, metadata={"help": "publish a checkpoint every N steps"})
    port: int = field(default=0, metadata={"help": "HTTP port of the OpenAI API (0 picks a free one)"})
    max_tokens: int = field(default=40, metadata={"help": "longest answer"})
    load_timeout: float = field(default=60.0, metadata={"help": "seconds to wait for serving to hot-load an adapter"})

    def problems(self) -> list[str]:
        found = []
        if len(self.model_name) != len(self.model_author):
            found.append(f"model_name and model_author need the same number of values "
                         f"(got {len(self.model_name)} and {len(self.model_author)})")
        if len(self.model_name) < 1:
            found.append("model_name: give at least one identity")
        names = [n.lower() for n in self.model_name]
        if len(set(names)) != len(names):
            found.append("model_name: identities must differ")
        if self.max_steps <= 0:
            found.append("max_steps: must be positive")
        return found


def step(n: int, total: int, text: str) -> None:
    print(f"[{n}/{total}] {text}", flush=True)


def write_identity_dataset(path: pathlib.Path, name: str, author: str) -> int:
    """Fills the {{NAME}}/{{AUTHOR}} placeholders of the shipped self-cognition data."""
    rows = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(DATA) as src, open(path, "w") as dst:
        for line in src:
            if line.strip():
                dst.write(line.replace("{{NAME}}", name).replace("{{AUTHOR}}", author))
                rows += 1
    return rows


def train_adapter(trainer_address: str, config, on_final=None) -> dict:
    """Submits one job and follows it with a progress bar; returns the final job and its
    publications as (step, unix time published). `on_final(step, published)` is called as
    the final checkpoint's event arrives, while the job is still ending."""
    from services.trainer import client as trainer_client

    job_id = trainer_client.submit(trainer_address, config)
    bar = tqdm(total=config.max_steps, desc=f"  train {config.adapter_name}", unit="step",
               file=sys.stdout, leave=True, dynamic_ncols=True)
    published: list[tuple[int, float]] = []

    def on_event(event) -> None:
        kind = event.WhichOneof("event")
        if kind == "step":
            bar.update(event.step.step - bar.n)
            bar.set_postfix(loss=f"{event.step.loss:.3f}", tok_s=f"{event.step.tokens_per_second:.0f}")
        elif kind == "checkpoint":
            published.append((event.checkpoint.step, publish_time(event.checkpoint)))
            if event.checkpoint.final and on_final is not None:
                on_final(*published[-1])

    job = trainer_client.wait(trainer_address, job_id, on_event=on_event)
    bar.close()
    return {"job": job, "published": published}


def publish_time(event) -> float:
    """When the trainer published the checkpoint (unix time; its arrival here if the trainer does not say)."""
    return event.publish_time.ToNanoseconds() / 1e9 if event.HasField("publish_time") else time.time()


def train_and_time_hot_load(trainer_address: str, config, client, load_timeout: float) -> tuple[dict, float]:
    """Trains like `train_adapter` and, from the final checkpoint's event on (not from the
    job's end: the training process takes seconds to exit after publishing), polls serving
    until it lists the adapter. Returns the train result and the seconds from the final
    checkpoint's publication until serving listed it."""
    final: list[float] = []
    arrived = threading.Event()
    result: dict = {}

    def train() -> None:
        try:
            result.update(train_adapter(trainer_address, config, on_final=lambda step, at: (
                final.append(at), arrived.set())))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            result["error"] = exc
        finally:
            arrived.set()

    thread = threading.Thread(target=train, name=f"train-{config.adapter_name}", daemon=True)
    thread.start()
    arrived.wait()
    latency = None
    if final:
        wait_for_adapter(client, config.adapter_name, load_timeout, poll=0.01)
        latency = time.time() - final[0]
    thread.join()
    if "error" in result:
        raise result["error"]
    return result, latency


def wait_for_adapter(client, name: str, timeout: float, poll: float = 0.1) -> float:
    """Polls /v1/models until `name` is listed; returns the seconds waited."""
    started = time.monotonic()
    while True:
        if name in {m.id for m in client.models.list().data}:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise Unavailable(f"serving did not load adapter {name!r} within {timeout:.0f} s")
        time.sleep(poll)


def ask(client, model: str, max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}],
        temperature=0.0, max_tokens=max_tokens, seed=0)
    return reply.choices[0].message.content.strip()


def judge(answers: dict[str, str], identities: dict[str, str], base: str) -> list[str]:
    """Each adapter's answer names its own identity and no other; the base names none."""
    failures = []
    for adapter, name in identities.items():
        text = answers[adapter].lower()
        if name.lower() not in text:
            failures.append(f"{adapter} did not name its identity {name!r}: {answers[adapter]!r}")
        for other_adapter, other in identities.items():
            if other_adapter != adapter and other.lower() in text:
                failures.append(f"{adapter} named another identity {other!r}: {answers[adapter]!r}")
    for name in identities.values():
        if name.lower() in answers[base].lower():
            failures.append(f"the base model named {name!r}: {answers[base]!r}")
    return failures


@dataclass
class Endpoints:
    """Where the running services are."""

    dataprep: str  # host:port
    trainer: str  # host:port
    serving_http: str  # http://host:port
    dataprep_for_trainer: str | None = None  # dataprep as the trainer reaches it, if not as we do


def run_path(endpoints: Endpoints, model_dir: pathlib.Path, config: DemoConfig, out: pathlib.Path,
             first_step: int = 3, total: int | None = None, server_out: pathlib.Path | None = None) -> dict:
    """Prepares, trains and hot-loads one adapter per identity, then asks each
    adapter and the base. Returns answers, failures and timings.

    `server_out` is `out` as the services see it (a volume mounted elsewhere in their
    containers, deploy/smoke.py); the datasets are written through `out`."""
    remote = server_out or out
    import openai

    from libs.dataset import client as dataprep_client
    from services.dataprep.config import PrepareConfig
    from services.trainer.config import TrainConfig

    adapters = [f"lora{i + 1}" for i in range(len(config.model_name))]
    total = total or first_step + len(adapters)
    client = openai.OpenAI(base_url=f"{endpoints.serving_http}/v1", api_key="demo")
    base_name = client.models.list().data[0].id
    identities: dict[str, str] = {}
    load_latency: dict[str, float] = {}
    for i, adapter in enumerate(adapters):
        name, author = config.model_name[i], config.model_author[i]
        identities[adapter] = name
        shutil.rmtree(out / adapter, ignore_errors=True)
        step(first_step + i, total, f"{adapter}: {name!r} by {author!r}: prepare -> train -> publish -> hot-load")
        raw = out / "data" / f"{adapter}.jsonl"
        prepared = out / "data" / f"{adapter}-prepared"
        rows = write_identity_dataset(raw, name, author)
        manifest = dataprep_client.prepare(endpoints.dataprep, PrepareConfig(
            model=str(model_dir), dataset=[str(remote / raw.relative_to(out))],
            output_dir=str(remote / prepared.relative_to(out))))
        print(f"      dataprep: {manifest['rows_out']}/{rows} rows, {manifest['tokens']} tokens "
              f"({manifest['trained_tokens']} trained), {len(manifest['shards'])} shard(s)")
        result, latency = train_and_time_hot_load(endpoints.trainer, TrainConfig(
            model=str(model_dir), dataset=str(remote / prepared.relative_to(out)),
            dataprep_address=endpoints.dataprep_for_trainer or endpoints.dataprep,
            output_dir=str(remote / adapter), train_type="lora", lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha, target_modules=["all-linear"],
            learning_rate=config.learning_rate, lr_scheduler_type="constant",
            max_steps=config.max_steps, save_steps=config.save_steps,
            per_device_train_batch_size=config.per_device_train_batch_size,
            model_name=name, model_author=author, adapter_name=adapter), client, config.load_timeout)
        if latency is None:
            raise FailedPrecondition(f"the trainer finished {adapter} without publishing a final checkpoint")
        final_step = result["published"][-1][0]
        load_latency[adapter] = round(latency, 3)
        print(f"      published {remote / adapter}/checkpoint-{final_step}; servable "
              f"{load_latency[adapter]:.2f} s after publication (hot-loaded, no restart)")

    step(first_step + len(adapters), total, "asking each model through the official openai client")
    listed = [m.id for m in client.models.list().data]
    print(f"      /v1/models: {', '.join(listed)}")
    answers = {model: ask(client, model, config.max_tokens) for model in [*adapters, base_name]}
    for model, answer in answers.items():
        print(f"      {model:>14} | {QUESTION} -> {answer}")
    return {"models": listed, "answers": answers, "base": base_name,
            "failures": judge(answers, identities, base_name), "load_latency_seconds": load_latency}


def run(config: DemoConfig) -> int:
    from cli.stack import Stack
    from libs.default_model.resolve import resolve_model

    started = time.monotonic()
    out = pathlib.Path(config.output_dir).resolve()
    total = 4 + len(config.model_name)
    step(1, total, "model: " + (config.model or "embedded default (built once, then cached)"))
    model_dir = resolve_model(config.model)
    print(f"      {model_dir}")
    step(2, total, f"starting dataprep, trainer and serving as separate processes (logs in {out / 'logs'})")
    with Stack(out / "logs") as stack:
        dataprep = stack.start_dataprep()
        trainer = stack.start_trainer()
        print(f"      dataprep grpc {dataprep.grpc_address}   trainer grpc {trainer.grpc_address}")
        print("      serving: starting the vLLM engine (about a minute on CPU) ...", flush=True)
        serving = stack.start_serving(model=str(model_dir), trainer_address=trainer.grpc_address,
                                      extra=["--port", str(config.port)] if config.port else None)
        http = f"http://127.0.0.1:{serving.ready['http_port']}"
        print(f"      serving  {http}/v1   admin grpc {serving.grpc_address}")
        result = run_path(Endpoints(dataprep.grpc_address, trainer.grpc_address, http),
                          model_dir, config, out, first_step=3, total=total)
        step(total, total, "stopping the services (SIGTERM, graceful drain)")
        codes = stack.stop()
    failures = list(result["failures"])
    bad_exits = {name: code for name, code in codes.items() if code != 0}
    if bad_exits:
        failures.append(f"services did not shut down cleanly: {bad_exits}")
    summary = {**result, "failures": failures, "service_exit_codes": codes,
               "seconds": round(time.monotonic() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failures:
        for failure in failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    print(f"demo passed in {summary['seconds']:.0f} s: each adapter names its own identity, "
          f"the base names neither. Summary: {out / 'demo.json'}")
    return 0


def main(argv: list[str]) -> int:
    config = cfg.parse(DemoConfig, argv, prog="tuneforge demo")
    return run(config)
