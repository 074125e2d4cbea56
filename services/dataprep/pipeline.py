"""One preparation, in-process: dataset rows (any supported file and row format)
-> chat-template tokens and label masks -> Arrow shards + rejects.jsonl +
manifest.json (written last)."""

from __future__ import annotations

import collections
import dataclasses
import importlib.metadata
import pathlib
import threading
from typing import Callable

from libs.common.config import to_dict, validate
from libs.common.errors import Cancelled
from services.dataprep import formats, inputs, jsonl, manifest as manifest_file, metrics, shards, template
from services.dataprep.config import PrepareConfig

REJECTS = "rejects.jsonl"
PROGRESS_EVERY = 100  # rows between progress reports (and every completed shard)


@dataclasses.dataclass
class Progress:
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    shards_written: int = 0


def resolve_model(model: str | None) -> pathlib.Path:
    from libs.default_model.resolve import resolve_model as resolve

    return pathlib.Path(resolve(model)).resolve()


def clear_outputs(output_dir: pathlib.Path) -> None:
    """Removes what an earlier preparation left in `output_dir` (ours only), the
    manifest first, so an interrupted re-run is never mistaken for complete."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / manifest_file.MANIFEST).unlink(missing_ok=True)
    for stale in [*output_dir.glob("shard-*.arrow"), output_dir / REJECTS]:
        stale.unlink(missing_ok=True)


def with_default_system(messages: list[dict], system: str | None) -> list[dict]:
    if system is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system}, *messages]


def to_row(record: inputs.Record, columns: dict[str, str]) -> jsonl.Row | jsonl.Reject:
    """A raw row to a conversation in whichever format it is written, or a Reject naming its field."""
    if record.error is not None:
        return jsonl.Reject(record.file, record.line, None, jsonl.INVALID_JSON, record.error, record.raw)
    result = formats.to_conversation(record.value, columns)
    if isinstance(result, formats.Problem):
        return jsonl.Reject(record.file, record.line, result.field, result.reason, result.message, record.raw)
    return jsonl.Row(record.file, record.line, result.messages, record.raw, tuple(result.losses))


def truncate(encoded: template.Encoded, max_length: int, strategy: str) -> template.Encoded | None:
    """ms-swift's --truncation_strategy on a row longer than max_length; None means delete it."""
    if strategy == "left":
        return template.Encoded(encoded.input_ids[-max_length:], encoded.labels[-max_length:])
    if strategy == "right":
        return template.Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length])
    return None


def tokenize_row(tokenizer, row: jsonl.Row, config: PrepareConfig) -> template.Encoded | jsonl.Reject:
    """System prompt priority: the row's own, then --system, then the template's default
    (which the template adds itself when the conversation has none)."""
    messages = with_default_system(row.messages, config.system)
    losses = list(row.losses or [None] * len(row.messages))
    if len(messages) > len(row.messages):
        losses.insert(0, None)
    try:
        encoded = template.encode(tokenizer, messages, losses, config.loss_scale)
    except template.TemplateError as exc:
        return row.reject(exc.field, jsonl.TEMPLATE, exc.message)
    if not encoded.trained_tokens:
        return row.reject("messages", jsonl.NO_TRAINABLE,
                          f"no token to train on under loss_scale {config.loss_scale} and the messages' loss")
    if config.max_length and len(encoded.input_ids) > config.max_length:
        length = len(encoded.input_ids)
        encoded = truncate(encoded, config.max_length, config.truncation_strategy)
        if encoded is None:
            return row.reject("messages", jsonl.TOO_LONG, f"{length} tokens; max_length is {config.max_length}")
        if not encoded.trained_tokens:
            return row.reject("messages", jsonl.TOO_LONG,
                              f"{length} tokens; truncated {config.truncation_strategy} to max_length "
                              f"{config.max_length}, no token to train on is left")
    return encoded


def versions() -> dict[str, str]:
    found = {}
    for package in ("tuneforge", "transformers", "tokenizers", "pyarrow"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def prepare(config: PrepareConfig, progress: Callable[[Progress], None] | None = None,
            cancelled: threading.Event | None = None) -> dict:
    """Runs one preparation to the end and returns its manifest. Raises Cancelled
    when `cancelled` is set (no manifest is written then)."""
    validate(config)
    datasets = inputs.resolve(config.dataset)
    sources = [source for dataset in datasets for source in dataset.sources]
    columns = formats.parse_columns(config.columns)
    model_dir = resolve_model(config.model)
    tokenizer = template.load_tokenizer(model_dir)
    output_dir = pathlib.Path(config.output_dir).resolve()
    clear_outputs(output_dir)

    state = Progress()
    by_reason: collections.Counter[str] = collections.Counter()
    writer = shards.ShardWriter(output_dir, config.shard_rows)

    def report() -> None:
        if progress:
            progress(dataclasses.replace(state))

    def completed(shard: shards.ShardInfo | None) -> None:
        if shard:
            state.shards_written += 1
            metrics.SHARDS_WRITTEN.inc()
            report()

    with open(output_dir / REJECTS, "w", encoding="utf-8") as rejects:
        for record in inputs.read(datasets, config.data_seed):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"preparation of {output_dir} cancelled after {state.rows_in} rows")
            state.rows_in += 1
            metrics.ROWS.inc()
            row = to_row(record, columns)
            result = tokenize_row(tokenizer, row, config) if isinstance(row, jsonl.Row) else row
            if isinstance(result, jsonl.Reject):
                rejects.write(result.to_json() + "\n")
                state.rows_rejected += 1
                by_reason[result.reason] += 1
                metrics.ROWS_REJECTED.labels(reason=result.reason).inc()
            else:
                state.rows_out += 1
                state.tokens += len(result.input_ids)
                state.trained_tokens += result.trained_tokens
                metrics.TOKENS.inc(len(result.input_ids))
                metrics.TRAINED_TOKENS.inc(result.trained_tokens)
                completed(writer.add(result.input_ids, result.labels))
            if state.rows_in % PROGRESS_EVERY == 0:
                report()
    completed(writer.flush())

    manifest = {
        "format": manifest_file.FORMAT,
        "rows_in": state.rows_in,
        "rows_out": state.rows_out,
        "rows_rejected": state.rows_rejected,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "args": {**to_dict(config), "model": str(model_dir), "output_dir": str(output_dir)},
        "chat_template_sha256": template.template_fingerprint(tokenizer),
        "tokenizer_sha256": template.tokenizer_fingerprint(model_dir, tokenizer),
        "columns": {field.name: str(field.type) for field in shards.SCHEMA},
        "label_ignore_index": template.IGNORE_INDEX,
        "sources": [dataclasses.asdict(source) for source in sources],
        "shards": [dataclasses.asdict(shard) for shard in writer.shards],
        "rejects": REJECTS,
        "versions": versions(),
    }
    manifest_file.write(output_dir, manifest)
    report()
    return manifest
