"""One preparation, in-process: dataset rows (any supported file and row format)
-> chat-template tokens and label masks (pt text: grouped into blocks, or split
to pack) -> Arrow shards + rejects.jsonl + manifest.json (written last). A full
disk fails it with DiskFull naming the file that did not fit; its shards and
temporary files are removed, no manifest."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import pathlib
import threading
from typing import Callable, Iterator

import numpy as np

from libs.common import disk
from libs.common.config import to_dict, validate
from libs.common.errors import Cancelled, InvalidArgument, NotFound
from libs.dataset.client import Progress
from libs.dataset.schema import IGNORE_INDEX, PACKED_PAIR_SCHEMA, PACKED_SCHEMA, describe
from services.dataprep import (cache, formats, inputs, jsonl, manifest as manifest_file, metrics, packing, parallel,
                               pretraining, ray_engine, shards, tasks, template)
from services.dataprep.config import PrepareConfig

REJECTS = "rejects.jsonl"
CHUNK_ROWS = 256  # rows tokenized per task (and between progress reports)
STREAMING_PACK_WINDOW = 10_000  # --streaming --packing: samples packed together, bounding memory
# where rows are tokenized, not what: left out of the manifest (and so of the fingerprint), so that
# both engines write the same bytes and reuse each other's shards
ENGINE_ARGS = ("engine", "ray_address")


def resolve_model(model: str | None) -> pathlib.Path:
    from libs.default_model.resolve import resolve_model as resolve

    return pathlib.Path(resolve(model)).resolve()


def check_output_dir(output_dir: str | pathlib.Path) -> None:
    """InvalidArgument unless `output_dir` is a directory or can be made one (no file in the way)."""
    path = pathlib.Path(output_dir).resolve()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                shown = output_dir if existing == path else f"{output_dir}: {existing}"
                raise InvalidArgument(f"{shown} is a file, not a directory", field="output_dir")
            return


def clear_outputs(output_dir: pathlib.Path) -> None:
    """Removes what an earlier preparation left in `output_dir` (ours only), the
    manifest first, so an interrupted re-run is never mistaken for complete."""
    with disk.writing(output_dir, field=shards.FIELD):
        output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / manifest_file.MANIFEST).unlink(missing_ok=True)
    for stale in [*output_dir.glob("shard-*.arrow"), output_dir / REJECTS, output_dir / shards.PARTIAL,
                  *output_dir.glob(".shard-*.tmp"), output_dir / f".{manifest_file.MANIFEST}.tmp",
                  output_dir / f".{shards.PARTIAL}.tmp"]:  # the temporary files of a killed run too
        stale.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    found = {}
    for package in ("tuneforge", "transformers", "tokenizers", "pyarrow"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found


def encode_chunk(tokenizer, records: list[inputs.Record], columns: dict[str, str],
                 config: PrepareConfig) -> list[tasks.Example | jsonl.Reject]:
    """Raw rows to tokenized rows (their shard columns, per --task, token columns as
    arrays) or rejects, in order: the work of one process."""
    return [_as_arrays(result) for result in tasks.encode_records(tokenizer, records, columns, config)]


def _as_arrays(result: tasks.Example | jsonl.Reject) -> tasks.Example | jsonl.Reject:
    return result.as_arrays() if isinstance(result, tasks.Example) else result


_WORKER: dict = {}  # a --num_proc worker's tokenizer, columns and config, set up once per process


def _init_worker(tokenizer, config: PrepareConfig) -> None:
    """In a worker: the parent's tokenizer (pickled, not reloaded from disk)."""
    _WORKER.update(tokenizer=tokenizer, columns=formats.parse_columns(config.columns), config=config)


def _encode_in_worker(records: list[inputs.Record]) -> list[tasks.Example | jsonl.Reject]:
    return encode_chunk(_WORKER["tokenizer"], records, _WORKER["columns"], _WORKER["config"])


def chunked(records: Iterator[inputs.Record], size: int, cancelled: threading.Event | None,
            where: pathlib.Path) -> Iterator[list[inputs.Record]]:
    """Lists of `size` records; raises Cancelled between chunks once `cancelled` is set."""
    while True:
        if cancelled is not None and cancelled.is_set():
            raise Cancelled(f"preparation of {where} cancelled")
        chunk = list(itertools.islice(records, size))
        if not chunk:
            return
        yield chunk


class Packer:
    """Collects kept samples and writes them packed by best-fit-decreasing into rows
    of at most `max_length` tokens: all at once, or (streaming) per `window` items.
    An item is one sample, or a preference pair (chosen then rejected) that must share
    a row; `pairs` packs pairs and adds each pair's margin (`margins` column)."""

    def __init__(self, writer: shards.ShardWriter, max_length: int, window: int | None, pairs: bool = False):
        self.writer, self.max_length, self.window, self.pairs = writer, max_length, window, pairs
        self.items: list[tuple[list[tuple[np.ndarray, np.ndarray]], float | None]] = []
        self.bins = 0
        self.packed_samples = 0

    def fits(self, example: tasks.Example) -> bool:
        return example.tokens <= self.max_length

    def add(self, example: tasks.Example) -> list[shards.ShardInfo]:
        c = example.columns
        if self.pairs:
            parts = [(c["chosen_input_ids"], c["chosen_labels"]), (c["rejected_input_ids"], c["rejected_labels"])]
        else:
            parts = [(c["input_ids"], c["labels"])]
        self.items.append(([(np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
                            for ids, labels in parts], c.get("margin")))
        return self.flush() if self.window and len(self.items) >= self.window else []

    def flush(self) -> list[shards.ShardInfo]:
        """Packs and writes the items held; returns the shards that filled."""
        lengths = [sum(len(ids) for ids, _ in parts) for parts, _ in self.items]
        bins = packing.best_fit_decreasing(lengths, self.max_length)
        completed = []
        for members in bins:
            parts = [part for i in members for part in self.items[i][0]]
            seq_lens = [len(ids) for ids, _ in parts]
            row = {
                "input_ids": np.concatenate([ids for ids, _ in parts]),
                "labels": np.concatenate([labels for _, labels in parts]),
                "position_ids": np.concatenate([np.arange(n, dtype=np.int32) for n in seq_lens]),
                "seq_lens": seq_lens,
            }
            if self.pairs:
                row["margins"] = [self.items[i][1] for i in members]
            info = self.writer.add(row)
            if info:
                completed.append(info)
        self.bins += len(bins)
        self.packed_samples += len(self.items)
        self.items = []
        return completed


def _piece(ids: np.ndarray, labels: np.ndarray) -> tasks.Example:
    """A pt block (or a piece to pack) as a row; it has no one place in the input (a block
    may span documents), and a kept row needs none."""
    return tasks.Example("", 0, "", "pt", {"input_ids": ids, "labels": labels, "length": len(ids)},
                         int(np.count_nonzero(labels != IGNORE_INDEX)))


def remove_partial(output_dir: pathlib.Path, written: list[shards.ShardInfo]) -> None:
    """After a failure or cancel: the shards and the in-progress listing go, so
    nothing is left that a reader could take for a (part of a) dataset."""
    (output_dir / shards.PARTIAL).unlink(missing_ok=True)
    for shard in written:
        (output_dir / shard.file).unlink(missing_ok=True)
    for stale in output_dir.glob(".shard-*.tmp"):
        stale.unlink(missing_ok=True)


def prepare(config: PrepareConfig, progress: Callable[[Progress], None] | None = None,
            cancelled: threading.Event | None = None) -> dict:
    """Runs one preparation to the end and returns its manifest; reuses the shards
    already in output_dir when they were prepared from the same input, arguments
    and tokenizer (Progress.reused says so). Raises Cancelled when `cancelled` is
    set (no manifest is written then, and the shards written so far are removed)."""
    validate(config)
    check_output_dir(config.output_dir)
    datasets = inputs.resolve(config.dataset)
    sources = [source for dataset in datasets for source in dataset.sources]
    columns = formats.parse_columns(config.columns)
    model_dir = resolve_model(config.model)
    output_dir = pathlib.Path(config.output_dir).resolve()
    args = {**{k: v for k, v in to_dict(config).items() if k not in ENGINE_ARGS}, "model": str(model_dir),
            "output_dir": str(output_dir)}
    tokenizer_dir = pathlib.Path(config.tokenizer).resolve() if config.tokenizer else model_dir
    if config.tokenizer and not tokenizer_dir.is_dir():  # before the fingerprint lists its files
        raise (InvalidArgument(f"{config.tokenizer!r}: not a directory", field="tokenizer") if tokenizer_dir.exists()
               else NotFound(f"{config.tokenizer!r}: no such directory", field="tokenizer"))
    fingerprint = cache.fingerprint(args, [source.path for source in sources], tokenizer_dir, versions())
    cached = cache.reusable(output_dir, fingerprint)
    if cached is not None:
        if progress:
            progress(Progress(rows_in=cached["rows_in"], rows_out=cached["rows_out"],
                              rows_rejected=cached["rows_rejected"], tokens=cached["tokens"],
                              trained_tokens=cached["trained_tokens"], shards_written=len(cached["shards"]),
                              reused=True))
        return cached
    if config.engine == "local":
        parallel.start_early(config.num_proc)
    tokenizer = template.load_tokenizer(tokenizer_dir, config.template, config.use_chat_template,
                                        field="tokenizer" if config.tokenizer else "model")
    # the first valid row fixes the dataset's kind (--task auto) and so the shards' columns
    # JSON lines are decoded where tokenized
    rows = inputs.read(datasets, config.data_seed, decode=False, txt_mode=config.txt_mode)
    admission, peeked, records = tasks.start(tokenizer, rows, columns, config)
    if config.packing and admission.kind not in ("sft", "pt", "preference", "reward"):
        raise InvalidArgument(f"{admission.kind} rows are not packed; use --packing false",
                              field="packing")
    pairs = admission.kind in ("preference", "reward")
    clear_outputs(output_dir)

    state = Progress()
    by_reason: collections.Counter[str] = collections.Counter()
    schema = ((PACKED_PAIR_SCHEMA if pairs else PACKED_SCHEMA) if config.packing
              else admission.schema)
    writer = shards.ShardWriter(output_dir, config.shard_rows, schema)
    packer = (Packer(writer, config.max_length, STREAMING_PACK_WINDOW if config.streaming else None, pairs)
              if config.packing else None)
    corpus = None  # pt: documents -> blocks, or pieces to pack
    if admission.kind == "pt":
        corpus = (pretraining.Pieces(config.max_length) if config.packing
                  else pretraining.Blocks(config.pt_block_size, config.drop_last_block))

    def report() -> None:
        if progress:
            progress(dataclasses.replace(state))

    def completed(written: list[shards.ShardInfo]) -> None:
        for _ in written:
            state.shards_written += 1
            metrics.SHARDS_WRITTEN.inc()
        if written:
            report()

    def keep(example: tasks.Example) -> None:
        state.tokens += example.tokens
        state.trained_tokens += example.trained_tokens
        if packer is not None:
            completed(packer.add(example))
        else:
            completed([info] if (info := writer.add(example.columns)) else [])

    if config.num_proc > 1:
        work, initargs = _encode_in_worker, (tokenizer, config)
    else:
        work, initargs = functools.partial(encode_chunk, tokenizer, columns=columns, config=config), ()
    try:
        with disk.writing(output_dir / REJECTS, field=shards.FIELD), open(output_dir / REJECTS, "w",
                                                                         encoding="utf-8") as rejects, \
                contextlib.ExitStack() as stack:
            chunks = chunked(records, CHUNK_ROWS, cancelled, output_dir)
            if config.engine == "ray":
                encoded = stack.enter_context(ray_engine.session(chunks, tokenizer, config))
            else:
                encoded = parallel.map_ordered(work, chunks, config.num_proc, _init_worker, initargs)
            # the rows read ahead to fix the dataset's kind are encoded already
            for results in itertools.chain([[_as_arrays(result) for result in peeked]], encoded):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled(f"preparation of {output_dir} cancelled after {state.rows_in} rows")
                tokens, trained_tokens = state.tokens, state.trained_tokens
                for result in results:
                    state.rows_in += 1
                    if not isinstance(result, jsonl.Reject):
                        result = admission.admit(result)
                    if packer is not None and corpus is None and not isinstance(result, jsonl.Reject) \
                            and not packer.fits(result):
                        result = result.reject("rejected", jsonl.TOO_LONG, f"chosen + rejected = {result.tokens} "
                                               f"tokens; a packed pair must fit max_length {config.max_length}")
                    if isinstance(result, jsonl.Reject):
                        rejects.write(result.to_json() + "\n")
                        state.rows_rejected += 1
                        by_reason[result.reason] += 1
                        metrics.ROWS_REJECTED.labels(reason=result.reason).inc()
                        continue
                    state.rows_out += 1
                    if corpus is None:
                        keep(result)
                        continue
                    for ids, labels in corpus.add(result.input_ids, result.labels):
                        keep(_piece(ids, labels))
                metrics.ROWS.inc(len(results))  # the chunk's counts at once: the same totals, fewer locks
                metrics.TOKENS.inc(state.tokens - tokens)
                metrics.TRAINED_TOKENS.inc(state.trained_tokens - trained_tokens)
                report()
        if not state.rows_in:
            raise InvalidArgument(f"{', '.join(config.dataset)}: no rows", field="dataset")
        if not state.rows_out:
            # Nothing to train on is a failed preparation, not an empty success; the rejects
            # stay for the user to read (no manifest: the output is not a dataset).
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(by_reason.items()))
            raise InvalidArgument(f"{', '.join(config.dataset)}: every row was rejected ({state.rows_rejected}; "
                                  f"{reasons}); see {output_dir / REJECTS}", field="dataset")
        if corpus is not None:
            tokens, trained_tokens = state.tokens, state.trained_tokens
            for ids, labels in corpus.finish():  # the shorter last block, when kept
                keep(_piece(ids, labels))
            metrics.TOKENS.inc(state.tokens - tokens)
            metrics.TRAINED_TOKENS.inc(state.trained_tokens - trained_tokens)
            if not corpus.tokens_out:
                raise InvalidArgument(f"{', '.join(config.dataset)}: {corpus.tokens_in} tokens, fewer than one block "
                                      f"of {config.pt_block_size}; lower --block_size, or keep the shorter last "
                                      f"block (--drop_last_block false)", field="block_size")
        if packer is not None:
            completed(packer.flush())
        completed([info] if (info := writer.flush()) else [])
    except BaseException:
        remove_partial(output_dir, writer.shards)
        raise

    manifest = {
        "format": manifest_file.FORMAT,
        "task": admission.kind,
        "rows_in": state.rows_in,
        "rows_out": state.rows_out,
        "rows_rejected": state.rows_rejected,
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "args": args,
        "fingerprint": fingerprint,
        "chat_template_sha256": template.template_fingerprint(tokenizer),
        "tokenizer_sha256": template.tokenizer_fingerprint(model_dir, tokenizer),
        "columns": describe(schema),
        "label_ignore_index": IGNORE_INDEX,
        "sources": [dataclasses.asdict(source) for source in sources],
        "shards": [dataclasses.asdict(shard) for shard in writer.shards],
        "rejects": REJECTS,
        "versions": versions(),
    }
    if corpus is not None:
        manifest["pt"] = corpus.manifest()
    if packer is not None:
        efficiency = packing.efficiency(state.tokens, packer.bins, config.max_length)
        manifest["packing"] = {"max_length": config.max_length, "samples": packer.packed_samples,
                               "bins": packer.bins, "efficiency": efficiency}
        metrics.PACKING_EFFICIENCY.set(efficiency)
    try:
        manifest_file.write(output_dir, manifest)
    except BaseException:
        remove_partial(output_dir, writer.shards)
        raise
    (output_dir / shards.PARTIAL).unlink(missing_ok=True)
    report()
    return manifest
