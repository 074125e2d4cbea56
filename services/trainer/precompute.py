"""--precompute_ref_log_probs: the reference model's log-probs of every row, computed in one
pass over the data before training (the same gRPC stream, each rank its slice, the training
micro-batch size), then gathered so that every rank holds every row's; kept in the run
directory keyed by each row's identity (`Row.key`: ReadShards' row id, whatever order the rows
come in) and attached to the rows as they are read (`Row.ref_logps`). Training then never runs
the reference, and a resumed run reads the file back instead of loading the reference again.

Every rank needs every row's values: with shuffling each epoch deals the rows to the ranks
anew, so a rank meets rows in a later epoch that another rank computed in the first.

Files: OUTPUT_DIR/reference_logps/<role>.rank<r>-of-<n>.npz (role `train` or `eval`), each
holding every row's values (a run directory need not be shared between nodes) and the
fingerprint of what the values depend on (dataset, model, reference); a file whose fingerprint
differs is computed again."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
from typing import Callable, Iterator

import numpy as np
import torch

from libs.common import disk
from libs.common.errors import FailedPrecondition
from services.trainer import data, distributed

LOG = logging.getLogger("tuneforge.trainer.precompute")
TABLE_DIR = "reference_logps"
# Part of every file's fingerprint: files written before tables held every rank's rows (only
# the writing rank's first-epoch rows) are computed again rather than failing in epoch 2.
TABLE_FORMAT = "all-ranks"


def table_path(output_dir: str | pathlib.Path, role: str, world: distributed.World) -> pathlib.Path:
    return pathlib.Path(output_dir) / TABLE_DIR / f"{role}.rank{world.rank}-of-{world.world_size}.npz"


def fingerprint(values: dict) -> str:
    """A short hash of what the reference log-probs depend on (plain JSON values)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def save(path: pathlib.Path, print_: str, table: dict[int, np.ndarray]) -> None:
    """Writes the table atomically (a killed run leaves the old file or none, never half a one)."""
    keys = np.array(sorted(table), dtype=np.int64)
    lengths = np.array([len(table[k]) for k in keys], dtype=np.int64)
    values = np.concatenate([table[k] for k in keys]).astype(np.float32) if len(keys) else np.zeros(0, np.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk.writing(path, field="output_dir"):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, lengths=lengths, values=values, fingerprint=np.array(print_))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: pathlib.Path, print_: str) -> dict[int, np.ndarray] | None:
    """The table in `path`, or None when there is none or it was computed for something else."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) != print_:
                LOG.info("%s was computed for another dataset or reference: computing it again", path)
                return None
            keys, lengths, values = f["keys"], f["lengths"], f["values"]
    except (OSError, ValueError, KeyError) as exc:  # unreadable: as if absent
        LOG.warning("%s is unreadable (%s): computing it again", path, exc)
        return None
    ends = np.cumsum(lengths)
    return {int(k): values[end - n:end] for k, n, end in zip(keys, lengths, ends)}


def compute(source: data.RowSource, collate: Callable[[list], data.MicroBatch], micro_batch_size: int,
            reference_logps: Callable[[data.MicroBatch], torch.Tensor],
            row_samples: Callable[[list], list[list[int]]], world: distributed.World,
            idle_forward: Callable[[], None]) -> dict[int, np.ndarray]:
    """One pass over the source's first epoch in micro-batches as training makes them:
    {row key: the reference log-prob of each of its samples}. `reference_logps(micro)` gives
    [num_samples]; `row_samples(rows)` says which samples are each row's. Distributed, every
    rank runs as many forwards as the rank with the most rows (a sharded forward is a
    collective): a rank out of rows runs `idle_forward` meanwhile."""
    table: dict[int, np.ndarray] = {}
    rows = (row for row, _ in source.epoch_rows(data.DataCursor()))
    while True:
        group = list(itertools.islice(rows, micro_batch_size))
        more = distributed.all_max(int(bool(group)), world) if world.distributed else bool(group)
        if not more:
            return table
        if not group:
            idle_forward()
            continue
        with torch.no_grad():
            sums = reference_logps(collate(group)).detach().float().cpu()
        for row, samples in zip(group, row_samples(group)):
            if row.key is None:
                raise FailedPrecondition("precompute_ref_log_probs needs each row's identity, which this dataset's "
                                         "reader does not give", field="precompute_ref_log_probs")
            table[row.key] = sums[samples].numpy()


class Annotated:
    """A RowSource whose rows carry their precomputed reference log-probs (`ref_logps`)."""

    def __init__(self, source: data.RowSource, table: dict[int, np.ndarray], role: str):
        self.source, self.table, self.role = source, table, role

    def epoch_rows(self, cursor: data.DataCursor) -> Iterator[tuple[data.Row | data.PairRow, data.DataCursor]]:
        for row, after in self.source.epoch_rows(cursor):
            values = self.table.get(row.key)
            if values is None:
                raise FailedPrecondition(f"no precomputed reference log-probs for {self.role} row {row.key}: the "
                                         f"dataset changed since they were computed; remove {TABLE_DIR}/ in the "
                                         f"run directory to compute them again", field="precompute_ref_log_probs")
            yield dataclasses.replace(row, ref_logps=values), after

    def __getattr__(self, name: str):  # the rest of the source's interface (count_rows, ...)
        if name == "source":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def annotate(source: data.RowSource, role: str, output_dir: str, print_: str, world: distributed.World,
             compute_table: Callable[[data.RowSource], dict[int, np.ndarray]]) -> Annotated:
    """`source` with its rows' reference log-probs: read from the run directory when they were
    computed for the same fingerprint, else computed now (and saved there)."""
    path = table_path(output_dir, role, world)
    print_ = f"{print_}:{TABLE_FORMAT}"
    table = load(path, print_)
    # every rank computes when any must: a sharded reference forward is a collective
    missing = distributed.all_max(int(table is None), world) if world.distributed else table is None
    if missing:
        LOG.info("computing the reference log-probs of the %s rows", role)
        table = {}
        for share in distributed.gather(compute_table(source), world):  # every rank's rows, on every rank
            table.update(share)
        save(path, print_, table)
    else:
        LOG.info("reference log-probs of the %s rows read from %s", role, path)
    return Annotated(source, table, role)
