"""Record batches on the wire: ReadShards sends each as one Arrow IPC stream (schema + batch)."""

from __future__ import annotations

import pyarrow as pa


def to_ipc_stream(batch: pa.RecordBatch) -> bytes:
    """One Arrow IPC stream: the schema and this one record batch."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def from_ipc_stream(data: bytes) -> pa.RecordBatch:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        return reader.read_next_batch()
