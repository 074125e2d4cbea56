"""The columns of a prepared dataset's shards, per dataset kind (the manifest's `task`), and
the label value no loss is computed on. dataprep writes these; every reader relies on them."""

from __future__ import annotations

import pyarrow as pa

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (torch's and HF's default)

INT32S = pa.list_(pa.int32())


def _field(name: str, type_: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


# One row a sample. `length`: its tokens (a preference pair: both sides').
SCHEMAS = {
    "sft": pa.schema([_field("input_ids", INT32S), _field("labels", INT32S), _field("length", pa.int32())]),
    "kto": pa.schema([_field("input_ids", INT32S), _field("labels", INT32S), _field("label", pa.bool_()),
                      _field("length", pa.int32())]),
    "preference": pa.schema([_field("chosen_input_ids", INT32S), _field("chosen_labels", INT32S),
                             _field("rejected_input_ids", INT32S), _field("rejected_labels", INT32S),
                             _field("margin", pa.float64(), nullable=True), _field("length", pa.int32())]),
    # prompt rows may carry extra columns (a reward function's inputs), nullable, before `length`
    "prompt": pa.schema([_field("input_ids", INT32S), _field("length", pa.int32())]),
}
SCHEMAS["pt"] = SCHEMAS["sft"]
SCHEMAS["reward"] = SCHEMAS["preference"]
KINDS = tuple(SCHEMAS)  # what a manifest's `task` may be
TOKEN_COLUMNS = frozenset(field.name for schema in SCHEMAS.values() for field in schema if field.type == INT32S)

# --packing true: several samples per row; position_ids restart at 0 for each, seq_lens are their lengths.
PACKED_SCHEMA = pa.schema([
    _field("input_ids", INT32S), _field("labels", INT32S), _field("position_ids", INT32S),
    _field("seq_lens", INT32S), _field("length", pa.int32()),
])
# --packing true on preference/reward rows: each pair's chosen then rejected sequence, side by side in one
# row (seq_lens holds two lengths a pair), and each pair's margin (null when the row has none).
PACKED_PAIR_SCHEMA = pa.schema([
    *list(PACKED_SCHEMA)[:-1],
    pa.field("margins", pa.list_(pa.float64()), nullable=False),
    PACKED_SCHEMA.field("length"),
])


def describe(schema: pa.Schema) -> dict[str, str]:
    """The manifest's `columns`: column name -> Arrow type."""
    return {field.name: str(field.type) for field in schema}


def kind_of(columns: dict[str, str]) -> str:
    """The kind of rows a dataset's columns (the manifest's `columns`) hold: sft (also pt),
    preference (also reward), kto or prompt, packed or not; a manifest's own `task` says more
    (pt, reward) where it has one."""
    if "chosen_input_ids" in columns or "margins" in columns:
        return "preference"
    if "label" in columns:
        return "kto"
    if "labels" in columns:
        return "sft"
    return "prompt"
