"""The prepared-dataset format on disk: Arrow IPC file shards of tokenized rows,
written as they fill, and read back only after their sha256 is verified."""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import pyarrow as pa

from libs.common.errors import FailedPrecondition, NotFound

SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    pa.field("length", pa.int32(), nullable=False),
])


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
    """Buffers rows and writes `shard_rows` of them per shard file, as each fills.
    A shard is one record batch with no metadata, so the same rows give the same bytes."""

    def __init__(self, output_dir: pathlib.Path, shard_rows: int):
        self.output_dir = output_dir
        self.shard_rows = shard_rows
        self.shards: list[ShardInfo] = []
        self._input_ids: list[list[int]] = []
        self._labels: list[list[int]] = []

    def add(self, input_ids: list[int], labels: list[int]) -> ShardInfo | None:
        """Adds one row; returns the shard it completed, if any."""
        self._input_ids.append(input_ids)
        self._labels.append(labels)
        return self.flush() if len(self._input_ids) >= self.shard_rows else None

    def flush(self) -> ShardInfo | None:
        """Writes the buffered rows as the next shard (none if the buffer is empty)."""
        if not self._input_ids:
            return None
        batch = to_batch(self._input_ids, self._labels)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_batch(batch)
        data = sink.getvalue()
        name = shard_name(len(self.shards))
        with open(self.output_dir / name, "wb") as f:
            f.write(data)
        info = ShardInfo(name, batch.num_rows, sum(len(ids) for ids in self._input_ids),
                         hashlib.sha256(data).hexdigest())
        self.shards.append(info)
        self._input_ids, self._labels = [], []
        return info


def read_verified(dataset_dir: pathlib.Path, file: str, sha256: str) -> pa.Table:
    """Reads one shard, refusing it unless its bytes have the manifest's sha256.
    Hashes and parses the same bytes, so what is served is what was verified."""
    path = dataset_dir / file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: shard listed in the manifest is missing", field="dataset_dir") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise FailedPrecondition(f"{path}: sha256 {actual} differs from the manifest's {sha256}; "
                                 "the shard changed after preparation", field="dataset_dir")
    table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    if not table.schema.equals(SCHEMA):
        raise FailedPrecondition(f"{path}: schema {table.schema} is not the prepared-dataset schema",
                                 field="dataset_dir")
    return table
