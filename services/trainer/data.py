"""The trainer's data path: this rank's rows of a prepared dataset read over gRPC from
dataprep, grouped into micro-batches and optimizer steps epoch by epoch, with the cursor
that says exactly where reading stands.

An epoch is one full pass over this rank's rows. Micro-batches and accumulation groups do
not cross an epoch boundary (the last of an epoch may be short), so an epoch always has
ceil(ceil(rows / micro_batch) / accumulation) optimizer steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import torch

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.dataset.client import Cursor, read_batches_with_ids
from libs.dataset.schema import IGNORE_INDEX, SCHEMAS
from libs.dataset.split import Holdout, rank_rows
from services.trainer import packing
from services.trainer.devices import to_device
from services.trainer.losses.sft import trained_tokens


# A prompt shard's own columns; every other column of it is an extra one (services.dataprep.tasks)
PROMPT_COLUMNS = frozenset(SCHEMAS["prompt"].names)


@dataclass(frozen=True)
class DataCursor:
    """Where reading stands: `skip` rows of this rank after dataprep cursor `start` of
    epoch `epoch` (a position in that epoch's order: shuffled epochs each have their own).
    Reading from it again yields exactly the rows not yet consumed, whatever batch sizes
    the server picks."""

    epoch: int = 0
    start: Cursor = Cursor()
    skip: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_index": self.start.shard_index, "row": self.start.row, "skip": self.skip}

    @classmethod
    def from_dict(cls, values: dict) -> "DataCursor":
        return cls(int(values["epoch"]), Cursor(int(values["shard_index"]), int(values["row"])), int(values["skip"]))


def order(shuffle: bool, seed: int) -> dict:
    """The order a run reads its rows in (saved beside its cursors: a cursor is a position in it)."""
    return {"shuffle": shuffle, "seed": seed} if shuffle else {"shuffle": False}


def check_order(saved: dict | None, shuffle: bool, seed: int, checkpoint) -> None:
    """Refuses to resume a checkpoint's cursors in another order than it read in: some rows
    would be trained twice in the epoch and others skipped."""
    saved = saved or order(False, seed)  # checkpoints from before shuffling read in file order
    if saved == order(shuffle, seed):
        return
    if saved["shuffle"] != shuffle:
        how = "shuffled" if saved["shuffle"] else "in file order"
        raise InvalidArgument(f"{checkpoint} read its rows {how}: resume it with --dataset_shuffle "
                              f"{str(saved['shuffle']).lower()}", field="dataset_shuffle")
    raise InvalidArgument(f"{checkpoint} shuffled its rows with seed {saved['seed']}: resume it with --seed "
                          f"{saved['seed']}", field="seed")


@dataclass(frozen=True)
class Row:
    """One shard row of a token dataset (sft, pt, kto; a packed row of any of them)."""

    input_ids: np.ndarray  # [length] int32
    labels: np.ndarray  # [length] int32, IGNORE_INDEX where not trained
    seq_lens: np.ndarray | None = None  # [samples] int32 for a packed row: the lengths of its samples
    label: bool | None = None  # a KTO row: desirable (true) or undesirable (false)
    margins: np.ndarray | None = None  # a packed preference row: [pairs] float64, NaN where a pair has none
    key: int | None = None  # the row's identity in its dataset (ReadShards' row id), whatever the read order
    # [samples] float32: the reference model's summed log-probs of each sample's labelled tokens, when
    # precomputed (--precompute_ref_log_probs; services.trainer.precompute)
    ref_logps: np.ndarray | None = None

    @property
    def samples(self) -> list[int]:
        """The lengths of the samples this row holds (one unless it is packed)."""
        return [int(n) for n in self.seq_lens] if self.seq_lens is not None else [len(self.input_ids)]


@dataclass(frozen=True)
class PairRow:
    """One preference (or reward) pair of an unpacked dataset: the same prompt with the chosen
    and the rejected answer, each a sequence of its own."""

    chosen: Row
    rejected: Row
    margin: float | None = None
    key: int | None = None  # the pair's identity in its dataset (ReadShards' row id)
    ref_logps: np.ndarray | None = None  # [2] float32: the reference's (chosen, rejected) log-probs, when precomputed


@dataclass(frozen=True)
class PromptRow:
    """One row of a prompt dataset (the online methods' data): the tokenized prompt, ending on
    the template's generation prompt, and its extra columns (a reward function's inputs, e.g.
    `solution`), by name."""

    input_ids: np.ndarray  # [length] int32
    columns: dict[str, Any]
    key: int | None = None  # the row's identity in its dataset (ReadShards' row id), whatever the read order


class RowSource(Protocol):
    """This rank's rows of one epoch from a cursor, each with the cursor just after it."""

    def epoch_rows(self, cursor: DataCursor) -> Iterator[tuple[Row, DataCursor]]: ...


def _lists(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values): row i is values[offsets[i]:offsets[i + 1]]."""
    array = batch.column(name)
    # offsets honour a sliced array; values are the unsliced child they index into
    return array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=False)


def batch_rows(batch: pa.RecordBatch, keys: np.ndarray | None = None) -> Iterator[Row | PairRow | PromptRow]:
    """The rows of one record batch of a prepared dataset, as the shard schema says
    (libs/dataset/schema.py): Row for sft/pt/kto rows and packed rows, PairRow for the
    pairs of an unpacked preference or reward dataset, PromptRow for prompt rows; `keys`:
    their row ids."""
    names = set(batch.schema.names)
    key = (lambda i: int(keys[i])) if keys is not None else (lambda i: None)
    if "labels" not in names and "chosen_input_ids" not in names:  # prompt rows: input_ids, extras, length
        offsets, ids = _lists(batch, "input_ids")
        extras = {name: batch.column(name).to_pylist() for name in batch.schema.names
                  if name not in PROMPT_COLUMNS}
        for i in range(batch.num_rows):
            yield PromptRow(ids[offsets[i]:offsets[i + 1]], {name: values[i] for name, values in extras.items()},
                            key=key(i))
        return
    if "chosen_input_ids" in names:
        sides = [_lists(batch, name) for name in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                  "rejected_labels")]
        margins = batch.column("margin").to_pylist()
        (co, c), (clo, cl), (ro, r), (rlo, rl) = sides
        for i in range(batch.num_rows):
            yield PairRow(Row(c[co[i]:co[i + 1]], cl[clo[i]:clo[i + 1]]), Row(r[ro[i]:ro[i + 1]], rl[rlo[i]:rlo[i + 1]]),
                          margins[i], key=key(i))
        return
    (id_offsets, ids), (label_offsets, labels) = _lists(batch, "input_ids"), _lists(batch, "labels")
    seq = _lists(batch, "seq_lens") if "seq_lens" in names else None
    margin_lists = batch.column("margins").to_pylist() if "margins" in names else None
    kto = batch.column("label").to_pylist() if "label" in names else None
    for i in range(batch.num_rows):
        yield Row(ids[id_offsets[i]:id_offsets[i + 1]], labels[label_offsets[i]:label_offsets[i + 1]],
                  seq[1][seq[0][i]:seq[0][i + 1]] if seq is not None else None,
                  label=kto[i] if kto is not None else None,
                  margins=(np.array([np.nan if m is None else m for m in margin_lists[i]], dtype=np.float64)
                           if margin_lists is not None else None), key=key(i))


@dataclass
class DataprepRows:
    """Reads this rank's rows from the dataprep service (the trainer's only data path): every
    epoch in its own order when `shuffle` (ReadShards' block shuffle, fixed by `seed` and the
    epoch), else in file order; only one side of an eval split when `holdout` (ReadShards
    splits by row id, then deals the side's rows to the ranks)."""

    address: str
    dataset_dir: str
    rank: int = 0
    world_size: int = 1
    shuffle: bool = False
    seed: int = 0
    holdout: Holdout | None = None
    max_batch_rows: int = 256
    timeout: float | None = None

    def rows(self, total: int, rank: int | None = None) -> int:
        """This rank's (or `rank`'s) rows in every epoch of a dataset of `total` rows (the
        manifest's count): exact, as the rows ReadShards deals are a function of the total."""
        side = self.holdout.rows(total) if self.holdout else total
        return rank_rows(side, self.rank if rank is None else rank, self.world_size)

    def epoch_rows(self, cursor: DataCursor) -> Iterator[tuple[Row, DataCursor]]:
        batch_start, skip = cursor.start, cursor.skip
        for batch, after, keys in read_batches_with_ids(
                self.address, self.dataset_dir, rank=self.rank, world_size=self.world_size, start=batch_start,
                max_batch_rows=self.max_batch_rows, timeout=self.timeout, shuffle=self.shuffle, seed=self.seed,
                epoch=cursor.epoch, holdout=self.holdout):
            for i, row in enumerate(batch_rows(batch, keys)):
                if i >= skip:
                    yield row, DataCursor(cursor.epoch, batch_start, i + 1)
            skip = max(0, skip - batch.num_rows)
            batch_start = after


@dataclass
class MicroBatch:
    """What one forward takes: rows padded to one length, and which sample each position is of."""

    input_ids: torch.Tensor  # [batch, seq] int64, right-padded with the pad id
    labels: torch.Tensor  # [batch, seq] int64, IGNORE_INDEX on padding (and at packed sample starts)
    # [batch, seq] int64, 0 on padding (with TUNEFORGE_PACKING_MASK=prebuilt, for packed rows: the
    # [batch, 1, seq, seq] float32 additive block-diagonal causal mask, services.trainer.packing)
    attention_mask: torch.Tensor
    tokens: int  # real (non-padding) input tokens
    position_ids: torch.Tensor | None = None  # [batch, seq] int64 restarting per sample, packed rows only
    # [batch, seq] int64: the sample each position belongs to, numbered 0.. in row order (a packed row holds
    # several), -1 on padding; log-probs and rewards per sequence are gathered by it
    sample_ids: torch.Tensor | None = None
    num_samples: int = 0
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # a method's own tensors (pair indices, ...)
    seq_lens: list[list[int]] | None = None  # packed rows only: each row's sample lengths
    # weight zero: run only so that this rank issues the collectives of the ranks with more micro-batches
    # (training.train_step, evaluation.evaluate); a method adds nothing of it to what ranks pool (kto's KL)
    filler: bool = False

    @property
    def trained_tokens(self) -> int:
        return trained_tokens(self.labels)

    def to(self, device) -> "MicroBatch":
        """This micro-batch with every tensor (a method's extras too) on `device`."""
        return replace(self, **{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def model_inputs(self, dtype: torch.dtype = torch.float32, path: str = "dense") -> dict:
        """Keyword arguments of the model's forward. Packed rows take the attention path of the
        model (packing.attention_path): a dense additive mask in the model's dtype, built now
        and dropped with the forward's inputs, flash-attn's varlen lengths, or position ids
        alone for FlexAttention's block mask."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask.ndim == 4:  # prebuilt at collation
            mask = self.attention_mask.clamp(min=torch.finfo(dtype).min).to(dtype)
            return {**inputs, "attention_mask": mask}
        length, device = self.input_ids.shape[1], self.input_ids.device
        if path == "varlen":
            return {**inputs, **packing.varlen_kwargs(self.seq_lens, length, device), "use_cache": False}
        if path == "block_mask":  # transformers builds the packed mask itself only without a cache
            return {**inputs, "use_cache": False}
        return {**inputs, "attention_mask": packing.block_causal_mask(self.seq_lens, length, dtype, device)}


def sample_ids(rows_samples: list[list[int]], length: int) -> torch.Tensor:
    """[batch, length] int64: for each position the index of its sample, counting the samples
    of all rows in order; -1 on padding."""
    out = torch.full((len(rows_samples), length), -1, dtype=torch.long)
    sample = 0
    for i, lengths in enumerate(rows_samples):
        start = 0
        for n in lengths:
            out[i, start:start + n] = sample
            start, sample = start + n, sample + 1
    return out


def collate(rows: list[Row], pad_id: int) -> MicroBatch:
    """Right-pads every row to the longest of the micro-batch; packed rows (with seq_lens)
    get restarting position ids, their sample lengths (from which model_inputs keeps the
    samples apart) and labels cut at every sample boundary, so each sample trains exactly as
    it would alone."""
    longest = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.from_numpy(row.input_ids.astype(np.int64))
        labels[i, :n] = torch.from_numpy(row.labels.astype(np.int64))
        attention_mask[i, :n] = 1
    tokens = sum(len(row.input_ids) for row in rows)
    rows_samples = [row.samples for row in rows]
    samples = sample_ids(rows_samples, longest)
    count = sum(map(len, rows_samples))
    if all(row.seq_lens is None for row in rows):
        return MicroBatch(input_ids, labels, attention_mask, tokens=tokens, sample_ids=samples, num_samples=count)
    if packing.prebuilt():
        attention_mask = packing.block_causal_mask(rows_samples, longest)
    return MicroBatch(input_ids, packing.cut_labels(labels, rows_samples), attention_mask, tokens=tokens,
                      position_ids=packing.position_ids(rows_samples, longest), sample_ids=samples, num_samples=count,
                      seq_lens=rows_samples)


@dataclass
class StepBatch:
    """The micro-batches of one optimizer step."""

    micro_batches: list[MicroBatch]
    cursor: DataCursor  # where reading stands after this step's rows
    data_wait_seconds: float  # time spent waiting for these rows

    @property
    def tokens(self) -> int:
        return sum(mb.tokens for mb in self.micro_batches)

    @property
    def trained_tokens(self) -> int:
        return sum(mb.trained_tokens for mb in self.micro_batches)


def steps_per_epoch(rows: int, micro_batch_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(rows / micro_batch_size) / accumulation)


def total_steps(max_steps: int, num_train_epochs: float, rows: int, micro_batch_size: int, accumulation: int) -> int:
    """max_steps when positive, else epochs x steps per epoch (rounded up)."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_train_epochs * steps_per_epoch(rows, micro_batch_size, accumulation)))


def step_batches(source: RowSource, micro_batch_size: int, accumulation: int,
                 collate_rows: Callable[[list], MicroBatch], start: DataCursor = DataCursor()) -> Iterator[StepBatch]:
    """Optimizer steps, epoch after epoch, forever, from `start` (a step boundary);
    `collate_rows` makes a micro-batch of rows (the training method's collate)."""
    cursor = start
    while True:
        rows = source.epoch_rows(cursor)
        group: list[MicroBatch] = []
        micro: list[Row | PairRow] = []
        waited, seen = 0.0, 0
        while True:
            asked = time.perf_counter()
            item = next(rows, None)
            waited += time.perf_counter() - asked
            if item is None:
                break
            row, after = item
            seen += 1
            micro.append(row)
            if len(micro) == micro_batch_size:
                group.append(collate_rows(micro))
                micro = []
                if len(group) == accumulation:
                    yield StepBatch(group, after, waited)
                    group, waited = [], 0.0
        next_epoch = DataCursor(cursor.epoch + 1)
        if micro:
            group.append(collate_rows(micro))
        if group:
            yield StepBatch(group, next_epoch, waited)
        if seen == 0 and cursor == DataCursor(cursor.epoch):
            raise FailedPrecondition("the dataset has no rows for this reader", field="dataset")
        cursor = next_epoch


@dataclass
class PromptBatch:
    """The prompt rows of one rollout (an online method's)."""

    rows: list[PromptRow]
    cursor: DataCursor  # where reading stands after this rollout's rows
    data_wait_seconds: float


def rollouts_per_epoch(rows: int, prompts_per_rollout: int) -> int:
    """Whole rollouts in an epoch of `rows` rows (this rank's, or the smallest rank's share):
    the rows left over are not read that epoch, as TRL's RepeatSampler drops its last short
    batch (a short rollout would be short of whole groups on some rank, and the next epoch,
    in another order, reads them)."""
    return rows // prompts_per_rollout


def prompt_batches(source: RowSource, prompts_per_rollout: int, per_epoch: int,
                   start: DataCursor = DataCursor(), done: int = 0) -> Iterator[PromptBatch]:
    """The rollouts' prompt rows, `per_epoch` rollouts an epoch (every rank the same number),
    epoch after epoch, forever, from `start`: a rollout boundary after `done` rollouts of its
    epoch."""
    if per_epoch < 1:
        raise FailedPrecondition(f"the dataset has fewer prompt rows for this reader than one rollout takes "
                                 f"({prompts_per_rollout}: per_device_train_batch_size x gradient_accumulation_steps "
                                 f"/ num_generations)", field="dataset")
    cursor = start
    while True:
        rows = source.epoch_rows(cursor)
        group: list[PromptRow] = []
        waited = 0.0
        while done < per_epoch:
            asked = time.perf_counter()
            item = next(rows, None)
            waited += time.perf_counter() - asked
            if item is None:
                raise FailedPrecondition(f"epoch {cursor.epoch} ended after {done} of its {per_epoch} rollouts: "
                                         f"the dataset changed under the run", field="dataset")
            row, after = item
            group.append(row)
            if len(group) == prompts_per_rollout:
                done += 1
                yield PromptBatch(group, after if done < per_epoch else DataCursor(cursor.epoch + 1), waited)
                group, waited = [], 0.0
        if hasattr(rows, "close"):  # the rows after the epoch's last whole rollout: end the stream now
            rows.close()
        cursor, done = DataCursor(cursor.epoch + 1), 0
