"""The client library of the dataprep service: prepare a dataset over gRPC and
read a rank's share of a prepared dataset as Arrow record batches.
gRPC failures surface as libs.common.errors types carrying the server's message."""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Callable, Iterator

import grpc
import numpy as np
import pyarrow as pa

from libs.common import channels
from libs.common.config import to_proto
from libs.common.errors import TuneForgeError, Unavailable, from_rpc_error, from_status
from libs.dataset.ipc import from_ipc_stream
from libs.dataset.split import Holdout
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


@dataclasses.dataclass
class Progress:
    """How far a preparation has got (dataprep reports it as it works)."""

    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    shards_written: int = 0
    reused: bool = False  # the output directory already held this very preparation


def _typed(exc: grpc.RpcError, address: str) -> TuneForgeError:
    return from_rpc_error(exc, "dataprep", address)


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a reader stands in a prepared dataset; pass it back as `start` to resume exactly."""

    shard_index: int = 0
    row: int = 0


def _channel(address: str) -> grpc.Channel:
    return channels.open_channel(address, options=_CHANNEL_OPTIONS)


def read_batches(address: str, dataset_dir: str, rank: int = 0, world_size: int = 1,
                 start: Cursor | None = None, max_batch_rows: int = 256,
                 timeout: float | None = None, shuffle: bool = False, seed: int = 0,
                 epoch: int = 0, holdout: Holdout | None = None) -> Iterator[tuple[pa.RecordBatch, Cursor]]:
    """Yields (record batch of this rank's rows, cursor after it); `shuffle` reads
    in the order fixed by (seed, epoch), the cursors being positions in it; `holdout`
    reads one side of an eval split only (libs.dataset.split), dealt among the ranks."""
    for batch, cursor, _row_ids in read_batches_with_ids(address, dataset_dir, rank, world_size, start,
                                                         max_batch_rows, timeout, shuffle, seed, epoch, holdout):
        yield batch, cursor


def read_batches_with_ids(address: str, dataset_dir: str, rank: int = 0, world_size: int = 1,
                          start: Cursor | None = None, max_batch_rows: int = 256,
                          timeout: float | None = None, shuffle: bool = False, seed: int = 0,
                          epoch: int = 0, holdout: Holdout | None = None
                          ) -> Iterator[tuple[pa.RecordBatch, Cursor, np.ndarray]]:
    """As read_batches, with each row's identity (its index in the whole dataset, whatever
    the order it is read in): (batch, cursor after it, row ids [rows] int64)."""
    start = start or Cursor()
    request = pb.ReadShardsRequest(dataset_dir=str(dataset_dir), rank=rank, world_size=world_size,
                                   start=pb.Cursor(shard_index=start.shard_index, row=start.row),
                                   max_batch_rows=max_batch_rows, shuffle=shuffle, seed=seed, epoch=epoch)
    if holdout is not None:
        request.holdout.CopyFrom(pb.Holdout(ratio=holdout.ratio, held_out=holdout.held_out))
    with _channel(address) as channel:
        responses = pb_grpc.DataprepServiceStub(channel).ReadShards(request, timeout=timeout)
        try:
            for response in responses:
                yield (from_ipc_stream(response.arrow_ipc), Cursor(response.next.shard_index, response.next.row),
                       np.asarray(response.row_ids, dtype=np.int64))
        except grpc.RpcError as exc:
            raise _typed(exc, address) from None
        finally:
            responses.cancel()  # a caller that stops early ends the stream on the server too


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What DescribeDataset says of a prepared dataset."""

    task: str  # sft, pt, preference, reward, kto or prompt
    packed: bool
    complete: bool
    rows: int
    shard_rows: tuple[int, ...]


def describe(address: str, dataset_dir: str, timeout: float | None = 30.0) -> DatasetInfo:
    """The kind and size of a prepared dataset (or one the service is preparing)."""
    with _channel(address) as channel:
        try:
            response = pb_grpc.DataprepServiceStub(channel).DescribeDataset(
                pb.DescribeDatasetRequest(dataset_dir=str(dataset_dir)), timeout=timeout)
        except grpc.RpcError as exc:
            raise _typed(exc, address) from None
    return DatasetInfo(response.task, response.packed, response.complete, response.rows, tuple(response.shard_rows))


def wait_complete(address: str, dataset_dir: str, stop: threading.Event | None = None,
                  poll_seconds: float = 1.0) -> DatasetInfo | None:
    """What DescribeDataset says of a dataset once it is complete: while the service is still
    preparing it, asks again every `poll_seconds`. None if `stop` is set first. A preparation
    that fails meanwhile leaves no dataset: the next ask raises (FAILED_PRECONDITION)."""
    stop = stop or threading.Event()
    while True:
        info = describe(address, dataset_dir)
        if info.complete:
            return info
        if stop.wait(poll_seconds):
            return None


def _progress_of(preparation: pb.Preparation) -> Progress:
    return Progress(rows_in=preparation.rows_in, rows_out=preparation.rows_out,
                    rows_rejected=preparation.rows_rejected, tokens=preparation.tokens,
                    shards_written=preparation.shards_written, reused=preparation.reused)


def prepare(address: str, config, on_progress: Callable[[Progress], None] | None = None,
            timeout: float | None = None) -> dict:
    """Starts a preparation on the service (`config`: dataprep's PrepareConfig, or any object
    with its fields), watches it to the end and returns its manifest; raises the typed error it failed with. Interrupting (Ctrl-C) cancels it."""
    with _channel(address) as channel:
        stub = pb_grpc.DataprepServiceStub(channel)
        try:
            started = stub.PrepareDataset(
                pb.PrepareDatasetRequest(arguments=to_proto(config, pb.PrepareArguments)), timeout=timeout)
        except grpc.RpcError as exc:
            raise _typed(exc, address) from None
        operation_id = started.preparation.id
        last = started.preparation
        try:
            for response in stub.WatchPreparation(pb.WatchPreparationRequest(id=operation_id), timeout=timeout):
                last = response.preparation
                if on_progress:
                    on_progress(_progress_of(last))
        except grpc.RpcError as exc:
            raise _typed(exc, address) from None
        except KeyboardInterrupt:
            stub.CancelPreparation(pb.CancelPreparationRequest(id=operation_id), timeout=10)
            raise
    if last.state == pb.PREPARATION_STATE_SUCCEEDED:
        return json.loads(last.manifest_json)
    if last.state in (pb.PREPARATION_STATE_FAILED, pb.PREPARATION_STATE_CANCELLED):
        raise from_status(last.error_code or grpc.StatusCode.INTERNAL, last.error or pb.PreparationState.Name(last.state))
    raise Unavailable(f"dataprep service at {address}: the watch of preparation {operation_id} ended "
                      f"in state {pb.PreparationState.Name(last.state)}")
