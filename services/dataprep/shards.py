"""The prepared-dataset format on disk: Arrow IPC file shards of tokenized rows,
written as they fill, and read back only after their sha256 is verified. A write
that fails for want of room raises DiskFull naming the file and leaves no
temporary file behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import numpy as np
import pyarrow as pa

from libs.common import disk
from libs.common.errors import FailedPrecondition, NotFound
from libs.dataset.schema import SCHEMAS, describe

SCHEMA = SCHEMAS["sft"]  # the shard schemas are the readers' contract too: libs/dataset/schema.py
PARTIAL = "shards.partial.json"  # the shards written so far, while a preparation runs
FIELD = "output_dir"  # what a full disk names: the argument that chose where shards go


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.arrow"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """One written shard as the manifest records it."""

    file: str
    rows: int
    tokens: int
    sha256: str


def to_batch(input_ids: list[list[int]], labels: list[list[int]]) -> pa.RecordBatch:
    return pa.record_batch([
        pa.array(input_ids, type=pa.list_(pa.int32())),
        pa.array(labels, type=pa.list_(pa.int32())),
        pa.array([len(ids) for ids in input_ids], type=pa.int32()),
    ], schema=SCHEMA)


class ShardWriter:
    """Buffers rows (dicts of the schema's columns but `length`) and writes
    `shard_rows` of them per shard file as each fills: through a temporary name,
    renamed into place, then listed in shards.partial.json, so a reader never
    sees a half-written shard. A shard is one record batch with no metadata,
    so the same rows give the same bytes."""

    def __init__(self, output_dir: pathlib.Path, shard_rows: int, schema: pa.Schema = SCHEMA):
        self.output_dir = output_dir
        self.shard_rows = shard_rows
        self.schema = schema
        self.shards: list[ShardInfo] = []
        self._names = [f.name for f in schema if f.name != "length"]
        self._columns: dict[str, list] = {name: [] for name in self._names}
        self._lengths: list[int] = []

    def add(self, row: dict) -> ShardInfo | None:
        """Adds one row; returns the shard it completed, if any. Its `length` is
        row["length"] when given (a preference pair: both sides), else len(input_ids)."""
        for name in self._names:
            self._columns[name].append(row[name])
        self._lengths.append(int(row["length"]) if "length" in row else len(row["input_ids"]))
        return self.flush() if len(self._lengths) >= self.shard_rows else None

    def flush(self) -> ShardInfo | None:
        """Writes the buffered rows as the next shard (none if the buffer is empty)."""
        lengths = self._lengths
        if not lengths:
            return None
        arrays = [column(self._columns[f.name], f.type) if f.name != "length" else
                  pa.array(lengths, type=pa.int32()) for f in self.schema]
        batch = pa.record_batch(arrays, schema=self.schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(batch)
        data = sink.getvalue()
        name = shard_name(len(self.shards))
        write_atomic(self.output_dir / name, data)
        info = ShardInfo(name, batch.num_rows, sum(lengths), hashlib.sha256(data).hexdigest())
        self.shards.append(info)
        self._columns = {n: [] for n in self._names}
        self._lengths = []
        write_partial(self.output_dir, self.schema, self.shards)
        return info


def column(values: list, type_: pa.DataType) -> pa.Array:
    """One shard column from its rows' values; rows of numpy arrays (token columns)
    are joined as one buffer and their offsets, not converted value by value."""
    if pa.types.is_list(type_) and values and all(isinstance(value, np.ndarray) for value in values):
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        offsets = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] < 2 ** 31:
            flat = pa.array(np.concatenate(values), type=type_.value_type)
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat, type=type_)
    return pa.array(values, type=type_)


def write_atomic(path: pathlib.Path, data: bytes, fsync: bool = False) -> None:
    """Writes `data` through `.<name>.tmp` renamed into place, so a reader sees all of it or
    nothing; a full disk raises DiskFull naming `path`, and no temporary file stays."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk.writing(path, field=FIELD):
            with open(tmp, "wb") as f:
                f.write(data)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_partial(output_dir: pathlib.Path, schema: pa.Schema, written: list[ShardInfo]) -> None:
    """shards.partial.json: the shards complete so far, replaced atomically after each."""
    write_atomic(output_dir / PARTIAL, json.dumps(
        {"columns": describe(schema), "shards": [dataclasses.asdict(s) for s in written]}, sort_keys=True).encode())


def read_partial(dataset_dir: pathlib.Path) -> dict | None:
    """The shards of a preparation still running (None before its first shard)."""
    try:
        return json.loads((dataset_dir / PARTIAL).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_verified(dataset_dir: pathlib.Path, file: str, sha256: str, columns: dict[str, str] | None = None) -> pa.Table:
    """Reads one shard, refusing it unless its bytes have the manifest's sha256.
    Hashes and parses the same bytes, so what is served is what was verified.
    `columns`: the manifest's (column -> type); unset means the unpacked schema."""
    path = dataset_dir / file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: shard listed in the manifest is missing", field="dataset_dir") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise FailedPrecondition(f"{path}: sha256 {actual} differs from the manifest's {sha256}; "
                                 "the shard changed after preparation", field="dataset_dir")
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except pa.ArrowException as exc:  # its sha256 was forged with it: hand-made, not prepared
        raise FailedPrecondition(f"{path}: not an Arrow IPC file ({exc})", field="dataset_dir") from None
    if describe(table.schema) != (columns or describe(SCHEMA)):
        raise FailedPrecondition(f"{path}: schema {table.schema} is not the prepared-dataset schema",
                                 field="dataset_dir")
    return table
