"""What a dataset task (`--task`) writes: one raw row -> the shard columns of its
kind (sft, pt, preference, reward, kto, prompt) or a Reject naming its field;
each task's shard schema; and the dataset-level rule that every row is of the
dataset's one kind (`auto`: the most common kind of its first valid rows)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from libs.common.errors import InvalidArgument
from libs.dataset.schema import PACKED_PAIR_SCHEMA, PACKED_SCHEMA, SCHEMAS, TOKEN_COLUMNS
from services.dataprep import formats, inputs, jsonl, template

LOG = logging.getLogger("tuneforge.dataprep")
# Names a prompt row's extra column may not take: a shard's own columns, of every task, packed or not. A reader
# tells a dataset's kind (and whether it is packed) by them while it is prepared, and token columns are
# converted as such (Example.as_arrays).
SHARD_COLUMNS = frozenset(name for schema in (*SCHEMAS.values(), PACKED_SCHEMA, PACKED_PAIR_SCHEMA)
                          for name in schema.names)

# --task auto: the dataset's kind is the one most of its first PEEK_VALID valid rows have (ties: the
# earliest), so one odd first row (an SFT row missing its answer) does not decide for the rest.
PEEK_VALID = 256
PEEK_LIMIT = 10_000  # rows read ahead at most while looking for them




@dataclasses.dataclass(frozen=True)
class Example:
    """One row ready for a shard: `columns` holds every column of its kind's schema
    (`length`: its tokens, for a pair both sides') and, for prompt rows, its extras."""

    file: str
    line: int
    raw: str
    kind: str
    columns: dict
    trained_tokens: int

    @property
    def tokens(self) -> int:
        return self.columns["length"]

    @property
    def input_ids(self) -> list[int]:  # the sequence a packer places (sft, pt, kto, prompt)
        return self.columns["input_ids"]

    @property
    def labels(self) -> list[int]:
        return self.columns["labels"]

    def reject(self, field: str | None, reason: str, message: str) -> jsonl.Reject:
        return jsonl.Reject(self.file, self.line, field, reason, message, self.raw)

    def as_arrays(self) -> Example:
        """The token columns as int32 numpy arrays: what a shard stores, a quarter of the
        bytes of a list of ints to send from a worker, and written without conversion."""
        columns = {name: np.asarray(value, dtype=np.int32) if name in TOKEN_COLUMNS else value
                   for name, value in self.columns.items()}
        return dataclasses.replace(self, columns=columns)


def with_system(messages: list[dict], losses: list, system: str | None) -> tuple[list[dict], list]:
    """System prompt priority: the row's own, then --system, then the template's default
    (which the template adds itself when the conversation has none)."""
    if system is None or messages[0]["role"] == "system":
        return messages, losses
    return [{"role": "system", "content": system}, *messages], [None, *losses]


def _truncate(encoded: template.Encoded, max_length: int, strategy: str) -> template.Encoded | None:
    """ms-swift's --truncation_strategy on a row longer than max_length; None means delete it."""
    if strategy == "left":
        return template.Encoded(encoded.input_ids[-max_length:], encoded.labels[-max_length:])
    if strategy == "right":
        return template.Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length])
    return None


class _Refused(Exception):
    def __init__(self, field: str | None, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


def _sequence(tokenizer, messages: list[dict], losses: list, tools: list | None, config, kind: str,
              side: str = "") -> template.Steps:
    """One trained sequence: chat template (or plain text + eos for pt and
    --use_chat_template false), then --max_length (not for pt, whatever its length);
    refuses one with nothing to train."""
    messages, losses = with_system(messages, losses, config.system)
    try:
        if kind == "pt":
            encoded = yield from template.encode_plain_steps(tokenizer, messages, losses, "all")
        elif not config.use_chat_template:
            encoded = yield from template.encode_plain_steps(tokenizer, messages, losses, config.loss_scale)
        else:
            encoded = yield from template.encode_steps(tokenizer, messages, losses, config.loss_scale, tools)
    except template.TemplateError as exc:
        raise _Refused(side + exc.field if side else exc.field, jsonl.TEMPLATE, exc.message) from None
    where = side.rstrip(".") or "messages"
    if not encoded.trained_tokens:
        raise _Refused(where, jsonl.NO_TRAINABLE,
                       f"no token to train on under loss_scale {config.loss_scale} and the messages' loss")
    if kind == "pt":  # never cut: the pipeline groups pt text into blocks, or splits it to pack (pretraining.py)
        return encoded
    if config.max_length and len(encoded.input_ids) > config.max_length:
        length = len(encoded.input_ids)
        encoded = _truncate(encoded, config.max_length, config.truncation_strategy)
        if encoded is None:
            raise _Refused(where, jsonl.TOO_LONG, f"{length} tokens; max_length is {config.max_length}")
        if not encoded.trained_tokens:
            raise _Refused(where, jsonl.TOO_LONG, f"{length} tokens; truncated {config.truncation_strategy} to "
                           f"max_length {config.max_length}, no token to train on is left")
    return encoded


def _prompt(tokenizer, conversation: formats.Conversation, config) -> template.Steps:
    messages, _ = with_system(conversation.messages, conversation.losses, config.system)
    try:
        if config.use_chat_template:
            input_ids = yield from template.encode_prompt_steps(tokenizer, messages, conversation.tools)
        else:
            input_ids = tokenizer("".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]
    except template.TemplateError as exc:
        raise _Refused(exc.field, jsonl.TEMPLATE, exc.message) from None
    if config.max_length and len(input_ids) > config.max_length:
        if config.truncation_strategy != "left":  # cutting the end would cut the generation prompt
            raise _Refused("messages", jsonl.TOO_LONG, f"{len(input_ids)} tokens; max_length is {config.max_length}")
        input_ids = input_ids[-config.max_length:]
    return list(input_ids)


def _columns(tokenizer, conversation: formats.Conversation, config) -> template.Steps:
    kind, tools = conversation.kind, conversation.tools
    if tools is not None and config.use_chat_template and not template.supports_tools(tokenizer):
        raise _Refused("tools", jsonl.TEMPLATE, "the chat template does not render tools; name one that does "
                       "(--template qwen) or drop the column")
    if kind == "prompt":
        taken = sorted(set(conversation.extras) & SHARD_COLUMNS)
        if taken:
            raise _Refused(taken[0], jsonl.INVALID_EXTRA, "an extra column may not be named like a shard column of "
                           f"any task ({', '.join(sorted(SHARD_COLUMNS))}); rename it with --columns")
        input_ids = yield from _prompt(tokenizer, conversation, config)
        return {"input_ids": input_ids, "length": len(input_ids), **conversation.extras}, 0
    if kind in ("preference", "reward"):
        chosen = yield from _sequence(tokenizer, conversation.messages, conversation.losses, tools, config, kind,
                                      "chosen.")
        rejected = yield from _sequence(tokenizer, conversation.rejected, conversation.rejected_losses, tools, config, kind,
                             "rejected.")
        return {"chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
                "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels,
                "margin": conversation.margin,
                "length": len(chosen.input_ids) + len(rejected.input_ids)}, \
            chosen.trained_tokens + rejected.trained_tokens
    encoded = yield from _sequence(tokenizer, conversation.messages, conversation.losses, tools, config, kind)
    columns = {"input_ids": encoded.input_ids, "labels": encoded.labels, "length": len(encoded.input_ids)}
    if kind == "kto":
        columns["label"] = conversation.label
    return columns, encoded.trained_tokens


def encode_record(tokenizer, record: inputs.Record, columns: dict[str, str], config) -> Example | jsonl.Reject:
    """One raw row to its shard columns under config.task, or a Reject naming its field.
    An error nobody foresaw on one row (a bug of ours) rejects that row as
    internal_error, logged with its traceback and counted, rather than ending a
    preparation that may have run for hours; the fuzzer (tests) fails on any."""
    try:
        return template.run(tokenizer, _encode_record(tokenizer, record, columns, config))
    except template.ReferenceMismatch:
        raise  # every row would be wrong alike: stop
    except Exception as exc:
        return _internal_error(record, exc)


def encode_records(tokenizer, records: list[inputs.Record], columns: dict[str, str],
                   config) -> list[Example | jsonl.Reject]:
    """encode_record of each record, in order. Each text is tokenized by one call of
    the fast tokenizer's encode on this thread, never its multi-threaded encode_batch:
    a process uses one core, so `--num_proc N` (or N Ray CPUs) means N cores. Per
    text, one encode costs what encode_batch with parallelism off does (a Python call
    is ~1 us against ~360 us of tokenizing a row of the benchmark's mix)."""
    return [encode_record(tokenizer, record, columns, config) for record in records]


def _internal_error(record: inputs.Record, exc: Exception) -> jsonl.Reject:
    """A row an unforeseen error (ours) stopped, rejected as internal_error; called while `exc` is handled,
    so its traceback is logged."""
    raw = record.raw if record.data is None else record.data.decode("utf-8", errors="replace").rstrip("\r\n")
    LOG.error("internal error on a dataset row; the row is rejected (internal_error)", exc_info=True,
              extra={"fields": {"file": record.file, "line": record.line, "error": f"{type(exc).__name__}: {exc}"}})
    return jsonl.Reject(record.file, record.line, None, jsonl.INTERNAL_ERROR,
                        f"internal error (a TuneForge bug; please report it with this row): "
                        f"{type(exc).__name__}: {exc}", raw)


def _encode_record(tokenizer, record: inputs.Record, columns: dict[str, str], config) -> template.Steps:
    """encode_record's work as steps (see template.Steps); returns its Example or Reject."""
    record = record.decoded()
    if record.error is not None:
        return jsonl.Reject(record.file, record.line, None, record.reason or jsonl.INVALID_JSON, record.error,
                            record.raw)
    conversation = formats.to_example(record.value, columns, config.task, config.format, record.surrogate_free)
    if isinstance(conversation, formats.Problem):
        return jsonl.Reject(record.file, record.line, conversation.field, conversation.reason, conversation.message,
                            record.raw)
    kind = "pt" if config.task == "pt" else conversation.kind
    try:
        values, trained = yield from _columns(tokenizer, dataclasses.replace(conversation, kind=kind), config)
    except _Refused as refused:
        return jsonl.Reject(record.file, record.line, refused.field, refused.reason, refused.message, record.raw)
    return Example(record.file, record.line, record.raw, kind, values, trained)


MAX_EXTRA_NESTING = 32  # lists/objects in an extra column; Arrow's IPC reader refuses 64 levels and more
_UNSTORABLE = (pa.ArrowException, OverflowError, RecursionError)  # pyarrow on a value it cannot store


def _arrow_type(value) -> pa.DataType:
    """An extra column's type, from the first row's value; string where that value
    has none Arrow can store (admit then refuses the value itself)."""
    if value is None:
        return pa.string()
    try:
        type_ = pa.array([value]).type
    except _UNSTORABLE:
        return pa.string()
    return type_ if _nesting(type_) <= MAX_EXTRA_NESTING else pa.string()


def _nesting(type_: pa.DataType) -> int:
    """How deep lists, structs and maps nest in a type (0 for a scalar); iterative, as a
    value may nest as deep as JSON allows."""
    deepest, stack = 0, [(type_, 0)]
    while stack:
        type_, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((type_.field(i).type, depth + 1) for i in range(type_.num_fields))
    return deepest


def _stored_as_given(value, stored) -> bool:
    """Whether Arrow keeps `value` as it is, rather than coercing it: a text read as a
    list of characters, an object's keys beyond the column's dropped, a number rounded."""
    if isinstance(value, dict):
        return isinstance(stored, dict) and value.keys() <= stored.keys() \
            and all(stored[k] is None for k in stored.keys() - value.keys()) \
            and all(_stored_as_given(item, stored[k]) for k, item in value.items())
    if isinstance(value, list):
        return isinstance(stored, list) and len(value) == len(stored) and all(map(_stored_as_given, value, stored))
    if isinstance(value, float) and value != value:  # NaN
        return isinstance(stored, float) and stored != stored
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(stored, numbers) and bool not in (type(value), type(stored)):
        return value == stored
    return type(value) is type(stored) and value == stored


class Admission:
    """The dataset's kind (from its first rows, or --task) and schema (its first row of that kind),
    and the check of every later row against them, in row order."""

    def __init__(self, task: str, first: Example | None):
        self.task = task
        self.kind = first.kind if first is not None else ("sft" if task == "auto" else task)
        base = SCHEMAS[self.kind]
        self.extra_types: dict[str, pa.DataType] = {}
        if first is not None and self.kind == "prompt":
            self.extra_types = {k: _arrow_type(v) for k, v in first.columns.items() if k not in base.names}
        fields = list(base)
        self.schema = pa.schema(fields[:-1] + [pa.field(k, t, nullable=True) for k, t in self.extra_types.items()]
                                + fields[-1:])

    def admit(self, example: Example) -> Example | jsonl.Reject:
        """The row as its shard takes it, or a Reject (an extra column that does not fit);
        a row of another kind fails the whole preparation (INVALID_ARGUMENT naming it)."""
        if {example.kind, self.kind} == {"sft", "prompt"}:  # auto: told apart by whether an answer exists
            if self.kind == "sft":
                return example.reject("messages", jsonl.NO_ASSISTANT, "no assistant message to train on")
            return example.reject("messages", jsonl.NOT_PROMPT, "a prompt row must end on a user (or tool) turn, "
                                  "like the dataset's rows")
        if example.kind == "sft" and self.kind in ("preference", "reward", "kto"):  # its marker column is missing
            if self.kind == "kto":
                return example.reject("label", jsonl.INVALID_LABEL, "missing (a KTO row needs label true or false)")
            return example.reject("rejected_response", jsonl.NO_REJECTED,
                                  "missing: a preference row needs rejected_response or rejected_messages")
        if example.kind != self.kind:
            why = "is --task" if self.task != "auto" else "is the most common among its first rows"
            raise InvalidArgument(f"{example.file}:{example.line}: a {example.kind} row in a {self.kind} dataset "
                                  f"(the dataset's kind {why}); one dataset holds one kind of row", field="dataset")
        if self.kind != "prompt":
            return example
        base = SCHEMAS["prompt"].names
        for name, value in example.columns.items():
            if name in base:
                continue
            if name not in self.extra_types:
                return example.reject(name, jsonl.INVALID_EXTRA, "a column the dataset's first row does not have "
                                      f"(its columns: {', '.join(self.extra_types) or 'none'})")
            try:
                kept = _stored_as_given(value, pa.array([value], type=self.extra_types[name]).to_pylist()[0])
            except _UNSTORABLE:
                kept = False
            if not kept:
                return example.reject(name, jsonl.INVALID_EXTRA, f"expected {self.extra_types[name]} like the "
                                      f"dataset's first row; got {formats._text(value)}")
        return dataclasses.replace(example, columns={**{k: None for k in self.extra_types}, **example.columns})


def start(tokenizer, records: Iterable[inputs.Record], columns: dict[str, str],
          config) -> tuple[Admission, list[Example | jsonl.Reject], Iterator[inputs.Record]]:
    """Reads ahead (PEEK_VALID valid rows, at most PEEK_LIMIT rows) to fix the
    dataset's kind and schema: the most common kind, its first row giving the
    extra columns; returns them, the rows read ahead, encoded, and the rest."""
    records = iter(records)
    peeked, found = [], []
    # in batches of the valid rows still wanted, so that reading stops where one at a time would
    while len(found) < PEEK_VALID and len(peeked) < PEEK_LIMIT:
        batch = list(itertools.islice(records, min(PEEK_VALID - len(found), PEEK_LIMIT - len(peeked))))
        if not batch:
            break
        for result in encode_records(tokenizer, batch, columns, config):
            peeked.append(result)
            if isinstance(result, Example):
                found.append(result)
    counts = collections.Counter(example.kind for example in found)
    kind = max(counts, key=counts.get, default=None)  # max keeps the first of equal counts: the earliest kind
    first = next((example for example in found if example.kind == kind), None)
    return Admission(config.task, first), peeked, records
