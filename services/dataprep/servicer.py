"""The DataprepService gRPC servicer: preparations as long-running operations
(each in its own thread, at most `max_concurrent` running) and ReadShards."""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import threading
import uuid

import grpc
import numpy as np

from libs.common import logs, paths
from libs.common.config import from_proto
from libs.common.errors import (Cancelled, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
                                TuneForgeError, grpc_errors)
from libs.dataset import split
from libs.dataset.ipc import to_ipc_stream
from libs.dataset.schema import SCHEMAS, describe, kind_of
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from services.dataprep import inputs, manifest as manifest_file, metrics, pipeline, reading, shards
from services.dataprep.shared_shards import SHARED as SHARED_SHARDS
from services.dataprep.config import DataprepServerConfig, PrepareConfig

LOG = logging.getLogger("tuneforge.dataprep")

S = pb.PreparationState
TERMINAL = (S.PREPARATION_STATE_SUCCEEDED, S.PREPARATION_STATE_FAILED, S.PREPARATION_STATE_CANCELLED)
ACTIVE = (S.PREPARATION_STATE_PENDING, S.PREPARATION_STATE_RUNNING)


def state_label(state: int) -> str:
    return S.Name(state).removeprefix("PREPARATION_STATE_").lower()


class Operation:
    """One preparation: its proto, bumped `version` on each change, its cancel event."""

    def __init__(self, config: PrepareConfig, arguments: pb.PrepareArguments):
        self.config = config
        self.cancelled = threading.Event()
        self.version = 0
        self.proto = pb.Preparation(id=uuid.uuid4().hex, state=S.PREPARATION_STATE_PENDING, arguments=arguments,
                                    output_dir=str(pathlib.Path(config.output_dir).resolve()))
        self.thread: threading.Thread | None = None


class DataprepServicer(pb_grpc.DataprepServiceServicer):
    def __init__(self, config: DataprepServerConfig | None = None):
        self.config = config or DataprepServerConfig()
        self._changed = threading.Condition()  # guards _operations and every Operation's proto
        self._operations: collections.OrderedDict[str, Operation] = collections.OrderedDict()
        self._slots = threading.Semaphore(self.config.max_concurrent)
        self._stopping = False

    # ---- preparations -------------------------------------------------------

    @grpc_errors
    def PrepareDataset(self, request, context):
        config = from_proto(PrepareConfig, request.arguments)
        inputs.resolve(config.dataset)  # fail the call itself, not later, for a missing file
        pipeline.check_output_dir(config.output_dir)  # or a file where the output directory goes
        operation = Operation(config, request.arguments)
        with self._changed:
            if self._stopping:
                raise FailedPrecondition("the server is shutting down")
            active = [op for op in self._operations.values() if op.proto.state in ACTIVE]
            clash = [op for op in active if op.proto.output_dir == operation.proto.output_dir]
            if clash:
                raise FailedPrecondition(f"preparation {clash[0].proto.id} is already writing "
                                         f"{operation.proto.output_dir}", field="output_dir")
            if len(active) >= self.config.max_concurrent + self.config.max_pending:
                raise ResourceExhausted(f"{len(active)} preparations are already pending or running "
                                        f"(max_concurrent {self.config.max_concurrent}, "
                                        f"max_pending {self.config.max_pending})")
            self._operations[operation.proto.id] = operation
            self._forget_finished()
            snapshot = self._snapshot(operation)
        self._count_state(S.PREPARATION_STATE_PENDING, None)
        operation.thread = threading.Thread(target=self._run, args=(operation,),
                                            name=f"prepare-{operation.proto.id[:8]}", daemon=True)
        operation.thread.start()
        logs.log(LOG, logging.INFO, "preparation started", id=operation.proto.id,
                 output_dir=operation.proto.output_dir)
        return pb.PrepareDatasetResponse(preparation=snapshot)

    @grpc_errors
    def GetPreparation(self, request, context):
        with self._changed:
            return pb.GetPreparationResponse(preparation=self._snapshot(self._find(request.id)))

    @grpc_errors
    def WatchPreparation(self, request, context):
        seen = -1
        with self._changed:
            operation = self._find(request.id)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: operation.version != seen or not context.is_active(), timeout=1.0)
                if not context.is_active():
                    return
                if operation.version == seen:
                    continue
                seen = operation.version
                snapshot = self._snapshot(operation)
            yield pb.WatchPreparationResponse(preparation=snapshot)
            if snapshot.state in TERMINAL:
                return

    @grpc_errors
    def CancelPreparation(self, request, context):
        with self._changed:
            operation = self._find(request.id)
            if operation.proto.state in ACTIVE:
                operation.cancelled.set()
            return pb.CancelPreparationResponse(preparation=self._snapshot(operation))

    def _find(self, operation_id: str) -> Operation:
        operation = self._operations.get(operation_id)
        if operation is None:
            raise NotFound(f"no preparation {operation_id!r}", field="id")
        return operation

    @staticmethod
    def _snapshot(operation: Operation) -> pb.Preparation:
        copy = pb.Preparation()
        copy.CopyFrom(operation.proto)
        return copy

    def _forget_finished(self) -> None:
        finished = [key for key, op in self._operations.items() if op.proto.state in TERMINAL]
        for key in finished[:max(0, len(finished) - self.config.keep_finished)]:
            del self._operations[key]

    def _update(self, operation: Operation, **fields) -> None:
        with self._changed:
            old_state = operation.proto.state
            for name, value in fields.items():
                setattr(operation.proto, name, value)
            new_state = operation.proto.state
            operation.version += 1
            self._changed.notify_all()
        if new_state != old_state:
            self._count_state(new_state, old_state)

    @staticmethod
    def _count_state(new: int, old: int | None) -> None:
        metrics.PREPARATIONS.labels(state=state_label(new)).inc()
        if old in ACTIVE:
            metrics.PREPARATIONS_ACTIVE.labels(state=state_label(old)).dec()
        if new in ACTIVE:
            metrics.PREPARATIONS_ACTIVE.labels(state=state_label(new)).inc()

    def _run(self, operation: Operation) -> None:
        """The preparation thread: wait for a slot (PENDING), run (RUNNING), end in a terminal state."""
        while not self._slots.acquire(timeout=0.2):
            if operation.cancelled.is_set():
                self._update(operation, state=S.PREPARATION_STATE_CANCELLED, error="cancelled while pending",
                             error_code=grpc.StatusCode.CANCELLED.value[0])
                return
        try:
            self._update(operation, state=S.PREPARATION_STATE_RUNNING)

            def progress(p: pipeline.Progress) -> None:
                self._update(operation, rows_in=p.rows_in, rows_out=p.rows_out, rows_rejected=p.rows_rejected,
                             tokens=p.tokens, shards_written=p.shards_written, reused=p.reused)
                metrics.preparation_progress(operation.proto.id, p.rows_in, p.rows_rejected)

            manifest = pipeline.prepare(operation.config, progress=progress, cancelled=operation.cancelled)
            self._update(operation, state=S.PREPARATION_STATE_SUCCEEDED,
                         manifest_json=json.dumps(manifest, sort_keys=True))
            logs.log(LOG, logging.INFO, "preparation succeeded", id=operation.proto.id,
                     rows_out=manifest["rows_out"], rows_rejected=manifest["rows_rejected"])
        except Cancelled as exc:
            self._update(operation, state=S.PREPARATION_STATE_CANCELLED, error=str(exc),
                         error_code=exc.code.value[0])
            logs.log(LOG, logging.INFO, "preparation cancelled", id=operation.proto.id)
        except TuneForgeError as exc:
            self._update(operation, state=S.PREPARATION_STATE_FAILED, error=str(exc), error_code=exc.code.value[0])
            logs.log(LOG, logging.WARNING, "preparation failed", id=operation.proto.id, error=str(exc))
        except Exception as exc:  # a bug of ours: keep the server up, report INTERNAL with the cause
            LOG.exception("preparation crashed", extra={"fields": {"id": operation.proto.id}})
            self._update(operation, state=S.PREPARATION_STATE_FAILED, error=f"internal error: {exc!r}",
                         error_code=grpc.StatusCode.INTERNAL.value[0])
        finally:
            metrics.preparation_ended(operation.proto.id)
            self._slots.release()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Refuses new preparations, cancels the active ones and waits for their threads."""
        with self._changed:
            self._stopping = True
            operations = list(self._operations.values())
        for operation in operations:
            operation.cancelled.set()
        for operation in operations:
            if operation.thread is not None:
                operation.thread.join(timeout)

    # ---- reading --------------------------------------------------------------

    @grpc_errors
    def ReadShards(self, request, context):
        if not request.dataset_dir:
            raise InvalidArgument("required: a prepared dataset directory", field="dataset_dir")
        dataset_dir = paths.argument(request.dataset_dir, "dataset_dir")
        world_size = request.world_size or 1  # unset means a single reader
        start = reading.Position(request.start.shard_index, request.start.row)
        max_batch_rows = request.max_batch_rows or reading.DEFAULT_BATCH_ROWS
        entries, columns, preparing = self._listing(dataset_dir, context)
        order: list[int] | None = None  # a shuffled read: the manifest index of the shard served v-th
        manifest_rows = [entry["rows"] for entry in entries]  # fixed when shuffled (a complete dataset)
        if request.shuffle:
            if preparing is not None:
                raise FailedPrecondition(f"{dataset_dir}: shuffle needs a complete dataset; preparation "
                                         f"{preparing.proto.id} is still running", field="shuffle")
            order = reading.shard_order(len(entries), request.seed, request.epoch)
            entries = [entries[i] for i in order]

        starts = [0]  # starts[i]: the id of manifest shard i's first row, as far as known yet

        def first_row(manifest_index: int) -> int:
            """The index in the whole dataset of a manifest shard's first row (what row ids count from)."""
            while len(starts) <= manifest_index:
                known = len(starts) - 1
                starts.append(starts[-1] + (manifest_rows[known] if order is not None else entries[known]["rows"]))
            return starts[manifest_index]

        def rows_order(served: int) -> np.ndarray | None:
            """A shuffled read's row order of the shard served `served`-th (None: file order)."""
            return None if order is None else reading.row_order(entries[served]["rows"], request.seed,
                                                                 request.epoch, order[served])

        def row_ids(served: int, positions, served_order: np.ndarray | None) -> np.ndarray:
            """The ids of the rows at `positions` of the shard served `served`-th."""
            manifest_index = served if order is None else order[served]
            return first_row(manifest_index) + reading.table_rows(positions, served_order)

        holdout = split.Holdout(request.holdout.ratio, request.holdout.held_out) if request.HasField("holdout") else None

        def dealt(served: int) -> np.ndarray:
            """The positions of the shard served `served`-th whose rows are on the asked side of the split."""
            ids = row_ids(served, range(entries[served]["rows"]), rows_order(served))
            return np.flatnonzero(holdout.keeps(ids))

        while preparing is not None and start.shard_index > len(entries):  # resuming past what is written yet
            entries, columns, preparing = self._wait_for_shards(dataset_dir, preparing, len(entries), context)
        reading.check([entry["rows"] for entry in entries], request.rank, world_size, start, max_batch_rows,
                      holdout.ratio if holdout else None)
        loaded: tuple[int, object, object] | None = None  # (shard served, its table, its row order)
        while True:
            shard_rows = [entry["rows"] for entry in entries]
            for batch in reading.plan(shard_rows, request.rank, world_size, start, max_batch_rows,
                                      dealt if holdout else None):
                entry = entries[batch.shard_index]
                if loaded is None or loaded[0] != batch.shard_index:
                    try:
                        table = SHARED_SHARDS.read(dataset_dir, entry["file"], entry["sha256"], columns)
                    except NotFound:
                        if preparing is None:
                            raise
                        # a listed shard goes only when its preparation fails or is cancelled: wait
                        # for its end and raise that (FAILED_PRECONDITION naming it), not the missing file
                        self._wait_for_shards(dataset_dir, preparing, 1 << 62, context)
                        raise
                    loaded = (batch.shard_index, table, rows_order(batch.shard_index))
                    metrics.SHARDS_SERVED.inc()
                records = reading.take(loaded[1], batch, loaded[2])
                ids = row_ids(batch.shard_index, batch.positions, loaded[2])
                data = to_ipc_stream(records)
                metrics.ROWS_SERVED.inc(records.num_rows)
                metrics.BYTES_SERVED.inc(len(data))
                yield pb.ReadShardsResponse(
                    arrow_ipc=data, num_rows=records.num_rows, shard=entry["file"], row_ids=ids.tolist(),
                    next=pb.Cursor(shard_index=batch.next.shard_index, row=batch.next.row))
            if preparing is None:
                return
            start = reading.Position(len(entries), 0)
            entries, columns, preparing = self._wait_for_shards(dataset_dir, preparing, len(entries), context)

    @grpc_errors
    def DescribeDataset(self, request, context):
        if not request.dataset_dir:
            raise InvalidArgument("required: a prepared dataset directory", field="dataset_dir")
        dataset_dir = paths.argument(request.dataset_dir, "dataset_dir")
        operation = self._preparing(dataset_dir)
        if operation is None:
            manifest = manifest_file.read(dataset_dir)
            entries, columns = manifest["shards"], manifest.get("columns") or describe(SCHEMAS["sft"])
            task = manifest.get("task") or kind_of(columns)  # manifests before `task` existed
        else:
            partial = shards.read_partial(dataset_dir) or {"shards": [], "columns": {}}
            entries, columns = partial["shards"], partial["columns"] or {}
            if not columns:
                raise FailedPrecondition(f"{dataset_dir}: preparation {operation.proto.id} has written no shard yet; "
                                         "its kind is not known", field="dataset_dir")
            task = kind_of(columns)
        return pb.DescribeDatasetResponse(task=task, packed="seq_lens" in columns, complete=operation is None,
                                          rows=sum(entry["rows"] for entry in entries),
                                          shard_rows=[entry["rows"] for entry in entries])

    def _preparing(self, dataset_dir: pathlib.Path) -> Operation | None:
        """The preparation of ours writing `dataset_dir` now, if any."""
        target = str(dataset_dir.resolve())
        with self._changed:
            return next((op for op in self._operations.values()
                         if op.proto.output_dir == target and op.proto.state in ACTIVE), None)

    def _listing(self, dataset_dir: pathlib.Path, context) -> tuple[list[dict], dict | None, Operation | None]:
        """(shards to serve, their columns, the running preparation or None when complete)."""
        operation = self._preparing(dataset_dir)
        if operation is None:
            manifest = manifest_file.read(dataset_dir)
            return manifest["shards"], manifest.get("columns"), None
        partial = shards.read_partial(dataset_dir) or {"shards": [], "columns": None}
        return partial["shards"], partial["columns"], operation

    def _wait_for_shards(self, dataset_dir: pathlib.Path, operation: Operation, known: int,
                         context) -> tuple[list[dict], dict | None, Operation | None]:
        """Blocks until the preparation writes shards past the first `known` or ends;
        returns the new listing (the manifest's once it succeeded)."""
        while True:
            with self._changed:
                seen = operation.version
                self._changed.wait_for(lambda: operation.version != seen or not context.is_active(), timeout=1.0)
                state, error = operation.proto.state, operation.proto.error
            if not context.is_active():
                raise Cancelled("the reader went away")
            if state == S.PREPARATION_STATE_SUCCEEDED:
                manifest = manifest_file.read(dataset_dir)
                return manifest["shards"], manifest.get("columns"), None
            if state in TERMINAL:
                raise FailedPrecondition(f"{dataset_dir}: preparation {operation.proto.id} {state_label(state)} "
                                         f"while being read: {error}", field="dataset_dir")
            partial = shards.read_partial(dataset_dir)
            if partial is not None and len(partial["shards"]) > known:
                return partial["shards"], partial["columns"], operation


def register(servicer: DataprepServicer):
    """For libs.common.server: adds the servicer, returns its full service name."""

    def add(server: grpc.Server) -> list[str]:
        pb_grpc.add_DataprepServiceServicer_to_server(servicer, server)
        return [pb.DESCRIPTOR.services_by_name["DataprepService"].full_name]

    return add
