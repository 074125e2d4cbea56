"""`tuneforge infer`: batch inference over dataset files (ms-swift's `swift infer`),
in this process, on the serving engine's code path (the vLLM engine, chat prompts,
context checks and the adapter registry's validation and loading), writing one
JSON line per input row, in input order, with a progress bar."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import pathlib
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from libs.common import config as cfg
from libs.common import logs, nlg
from libs.common.errors import InvalidArgument, TuneForgeError
from services.dataprep import formats, inputs
from services.dataprep.jsonl import NO_ASSISTANT
from services.serving.adapters import AdapterRegistry
from services.serving.admission import Admission
from services.serving.api import generation
from services.serving.config import DTYPES, LORA_RANKS, DeployConfig, resolve_base_model
from services.serving.engine import Engine

LOG = logging.getLogger("tuneforge.serving.infer")
# The adapter's name inside this process; it never leaves it.
ADAPTER = "adapter"


@dataclass
class InferConfig:
    """Generate a response for every row of `--val_dataset` with the base model or one
    LoRA adapter; rows ending in an assistant turn keep it as `labels`."""

    model: str | None = field(default=None, metadata={
        "help": "base model directory; unset: the adapter's args.json `model`, else the embedded default model"})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "one LoRA adapter to apply: PATH (an adapter or a run directory -> its newest checkpoint)"})
    val_dataset: list[str] = field(default_factory=list, metadata={
        "help": "dataset files (.jsonl/.json/.csv/.parquet, a directory or a glob; `file#N` samples N rows)"})
    result_path: str | None = field(default=None, metadata={
        "help": "JSON Lines output; unset: infer_result/<time>.jsonl beside the first adapter, else in the cwd"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "longest response in tokens; unset: what the context leaves"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature; 0 is greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int | None = field(default=42, metadata={"help": "sampling seed (per row), for repeatable sampled runs"})
    stop_words: list[str] = field(default_factory=list, metadata={"help": "strings that end a response"})
    max_batch_size: int = field(default=16, metadata={"help": "rows in flight in the engine at once"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt + response in tokens; unset: the model's"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest adapter rank accepted",
                                                      "choices": list(LORA_RANKS)})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "weights dtype; unset: float32 on CPU, auto on GPU", "choices": list(DTYPES)})
    data_seed: int = field(default=42, metadata={"help": "seed of `file#N` row sampling"})
    metric: str | None = field(default=None, metadata={
        "help": "nlg: score the responses against the rows' labels with ms-swift's nlg metric (ROUGE-1/2/L, "
                "BLEU-4; libs.common.nlg)", "choices": ["nlg"]})
    log_level: str = field(default="WARNING", metadata={
        "help": "log level", "choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})

    def problems(self) -> list[str]:
        found = []
        if not self.val_dataset:
            found.append("val_dataset: give at least one dataset file")
        if len(self.adapters) > 1:
            found.append(f"adapters: infer applies one adapter per run; got {len(self.adapters)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            found.append(f"max_new_tokens: must be at least 1; got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            found.append(f"temperature: must be in [0, 2]; got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            found.append(f"top_p: must be in (0, 1]; got {self.top_p}")
        if self.max_batch_size < 1:
            found.append(f"max_batch_size: must be at least 1; got {self.max_batch_size}")
        if any(not word for word in self.stop_words):
            found.append("stop_words: must not be empty strings")
        return found

    def adapter_path(self) -> str | None:
        """The adapter's path; `NAME=PATH` (deploy's form) is accepted too."""
        if not self.adapters:
            return None
        spec = self.adapters[0]
        name, sep, path = spec.partition("=")
        return path if sep and name and path and not pathlib.Path(spec).exists() else spec


@dataclass
class Sampling:
    """What `generation.sampling_params` reads, from the config (the HTTP requests' fields)."""

    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    n: int = 1

    def token_ids_to_check(self) -> dict[str, list[int]]:
        return {}

    def vllm_fields(self) -> dict:
        """As vLLM's ChatCompletionRequest takes them (the messages are rendered by us)."""
        return {"messages": [], "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": self.stop, "n": self.n}


@dataclass
class Row:
    index: int
    source: str  # file:line
    messages: list[dict] | None = None
    labels: str | None = None
    error: str | None = None


def rows(config: InferConfig) -> list[Row]:
    """Every input row as a prompt: the messages up to the last assistant turn (which
    becomes `labels`). A row that is not a conversation keeps its place with an error."""
    found = []
    try:
        datasets = inputs.resolve(config.val_dataset)
    except TuneForgeError as exc:
        raise type(exc)(exc.message, field="val_dataset") from exc
    for index, record in enumerate(inputs.read(datasets, config.data_seed)):
        row = Row(index, f"{record.file}:{record.line}")
        found.append(row)
        if record.error is not None:
            row.error = f"not JSON: {record.error}"
            continue
        conversation, answered = _conversation(record.value)
        if isinstance(conversation, formats.Problem):
            row.error = f"{conversation.field + ': ' if conversation.field else ''}{conversation.message}"
            continue
        messages = [dict(m) for m in conversation.messages]
        last = messages.pop() if messages and messages[-1]["role"] == "assistant" else None
        if answered and last is not None:
            row.labels = last["content"]
        if not messages or messages[-1]["role"] == "system":
            row.error = "no user turn to answer"
            continue
        row.messages = messages
    return found


def _conversation(value) -> tuple[formats.Conversation | formats.Problem, bool]:
    """A row in any of dataprep's formats, and whether it carries an answer. Training
    needs an assistant turn; a prompt to answer does not, so a row without one is read
    with an empty placeholder answer (in its own format) that is dropped again."""
    conversation = formats.to_conversation(value)
    if not (isinstance(conversation, formats.Problem) and conversation.reason == NO_ASSISTANT):
        return conversation, True
    row = dict(value)
    chat_key = next((k for k in formats.MESSAGE_KEYS if isinstance(row.get(k), list) and row[k]), None)
    if chat_key is None:
        row["response"] = ""
    elif isinstance(row[chat_key][0], dict) and "from" in row[chat_key][0]:
        row[chat_key] = [*row[chat_key], {"from": "gpt", "value": ""}]
    else:
        row[chat_key] = [*row[chat_key], {"role": "assistant", "content": ""}]
    return formats.to_conversation(row), False


def default_result_path(config: InferConfig) -> pathlib.Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    adapter = config.adapter_path()
    root = pathlib.Path(adapter) if adapter else pathlib.Path.cwd()
    return root / "infer_result" / f"{stamp}.jsonl"


async def _answer(engine: Engine, registry: AdapterRegistry, model: str, row: Row, sampling: Sampling,
                  max_new_tokens: int | None) -> dict:
    record = {"index": row.index, "source": row.source, "messages": row.messages, "labels": row.labels}
    if row.error is not None:
        return {**record, "response": None, "error": row.error}
    # The HTTP endpoints' own path: admission, lease, budget, sampling, generation, per-model metrics.
    job = generation.Job.open(_State(engine, registry), model, time.perf_counter())
    try:
        prompt = await engine.chat_prompt(row.messages)
        max_tokens = engine.completion_budget(len(prompt), max_new_tokens)
        job.tally.prompt_tokens = len(prompt)
        (choice,) = await generation.complete(job, [prompt], generation.sampling_params(
            sampling, max_tokens, engine, generation.chat_protocol()), 1)
    except TuneForgeError as exc:
        return {**record, "response": None, "error": exc.message}
    finally:
        job.close()
    return {**record, "response": "".join(choice.text), "finish_reason": choice.finish_reason,
            "usage": job.tally.usage()}


@dataclass
class _State:
    """The part of ServingState that `generation.Job` uses. Infer bounds its concurrency
    itself (--max_batch_size), so admission never refuses here."""

    engine: Engine
    registry: AdapterRegistry
    admission: Admission = field(default_factory=lambda: Admission(sys.maxsize))


async def _infer(config: InferConfig, out: pathlib.Path) -> tuple[int, int, list[tuple[str, str]]]:
    """(rows, rows without a response, (response, labels) of the rows that have both)."""
    work = rows(config)  # dataset problems fail now, before a minute of engine start
    if config.metric == "nlg" and not any(row.labels is not None for row in work):
        raise InvalidArgument("nlg: no row of --val_dataset ends in an assistant turn to score against",
                              field="metric")
    adapter = config.adapter_path()
    model_dir = resolve_base_model(DeployConfig(model=config.model, adapters=[f"{ADAPTER}={adapter}"] if adapter else []))
    base_name = model_dir.name if model_dir.name != ADAPTER else "base"
    registry = AdapterRegistry(None, model_dir, base_name, config.max_lora_rank)
    if adapter:
        try:
            registry.validate(ADAPTER, adapter)
        except TuneForgeError as exc:
            raise type(exc)(f"adapters: {exc.message}", field="adapters") from exc
    engine = Engine.start(model_dir, 1, config.max_lora_rank, config.max_model_len, config.torch_dtype)
    failed, answered = 0, []
    try:
        registry.engine = engine
        model = base_name
        if adapter:
            await registry.load(ADAPTER, adapter)
            model = ADAPTER
        sampling = Sampling(config.temperature, config.top_p, config.seed, list(config.stop_words))
        limit = asyncio.Semaphore(config.max_batch_size)

        async def one(row: Row) -> dict:
            async with limit:
                return await _answer(engine, registry, model, row, sampling, config.max_new_tokens)

        out.parent.mkdir(parents=True, exist_ok=True)
        tasks = [asyncio.create_task(one(row)) for row in work]
        with out.open("w", encoding="utf-8") as sink, tqdm(total=len(work), desc="infer", unit="row",
                                                           file=sys.stderr) as bar:
            # In input order: row i is written once rows 0..i are done; the bar counts rows written.
            for task in tasks:
                record = await task
                failed += record.get("error") is not None
                if record.get("response") is not None and record["labels"] is not None:
                    answered.append((record["response"], record["labels"]))
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                bar.update(1)
    finally:
        engine.shutdown()
        # Collect vLLM's client now, while the interpreter is whole: its finalizer at exit
        # would shut it down a second time, with module globals already gone.
        registry.engine = engine.llm = None
        gc.collect()
    return len(work), failed, answered


def infer(config: InferConfig) -> int:
    logs.setup("infer", config.log_level)
    out = pathlib.Path(config.result_path) if config.result_path else default_result_path(config)
    started = time.perf_counter()
    total, failed, answered = asyncio.run(_infer(config, out))
    print(f"tuneforge infer: {total} rows -> {out} ({failed} without a response) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    if config.metric == "nlg":
        print(nlg_line(answered), flush=True)
    logs.log(LOG, logging.INFO, "infer done", rows=total, failed=failed, result_path=str(out))
    # The result file is complete either way; a non-zero exit tells scripts some rows have no response.
    return 0 if failed == 0 else 1


def nlg_line(answered: list[tuple[str, str]]) -> str:
    """ms-swift's nlg scores of (response, labels) pairs, as infer prints them."""
    segmenter, cut = nlg.segmenter()
    scores, scored = nlg.nlg_scores([r for r, _ in answered], [l for _, l in answered], cut)
    shown = ", ".join(f"{key} {value:.4f}" for key, value in scores.items())
    return f"tuneforge infer: nlg over {scored} of {len(answered)} answered rows: {shown} (words: {segmenter})"


def main(argv: list[str]) -> int:
    return infer(cfg.parse(InferConfig, argv, prog="tuneforge infer"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
