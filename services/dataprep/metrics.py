"""Prometheus metrics of the dataprep service (`tuneforge_dataprep_...`): totals, and the
running preparations' own gauges (label `preparation`, the preparation's id), removed when the
preparation ends so cardinality stays bounded by the preparations running.
Counter names carry no `_total`: prometheus_client appends it in the exposition."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from services.dataprep.jsonl import REASONS

ROWS = Counter("tuneforge_dataprep_rows_processed", "Dataset rows read (kept or rejected).")
ROWS_REJECTED = Counter("tuneforge_dataprep_rows_rejected", "Dataset rows rejected, by reason.", ["reason"])
TOKENS = Counter("tuneforge_dataprep_tokens", "Tokens written to shards.")
TRAINED_TOKENS = Counter("tuneforge_dataprep_trained_tokens", "Tokens written to shards with a label (trained).")
SHARDS_WRITTEN = Counter("tuneforge_dataprep_shards_written", "Shard files written by preparations.")
PREPARATIONS = Counter("tuneforge_dataprep_preparations", "Preparations entering each state.", ["state"])
PREPARATIONS_ACTIVE = Gauge("tuneforge_dataprep_preparations_active",
                            "Preparations pending or running now, by state.", ["state"])
SHARDS_SERVED = Counter("tuneforge_dataprep_shards_served", "Shards (verified) served by ReadShards.")
ROWS_SERVED = Counter("tuneforge_dataprep_rows_served", "Rows served by ReadShards.")
BYTES_SERVED = Counter("tuneforge_dataprep_served_bytes", "Arrow IPC bytes served by ReadShards.")
SHARDS_IN_MEMORY = Gauge("tuneforge_dataprep_shards_in_memory_bytes",
                         "Bytes of verified shards held for the ReadShards streams serving them (one copy a shard).")
PACKING_EFFICIENCY = Gauge("tuneforge_dataprep_packing_efficiency_ratio",
                           "Real tokens over packed slots (rows x max_length) of the last packed preparation.")

PREPARATION_ROWS_READ = Gauge("tuneforge_dataprep_preparation_rows_read",
                              "Rows the running preparation has read so far (kept or rejected).", ["preparation"])
PREPARATION_ROWS_REJECTED = Gauge("tuneforge_dataprep_preparation_rows_rejected",
                                  "Rows the running preparation has rejected so far.", ["preparation"])
_PER_PREPARATION = (PREPARATION_ROWS_READ, PREPARATION_ROWS_REJECTED)


def preparation_progress(preparation: str, rows_read: int, rows_rejected: int) -> None:
    PREPARATION_ROWS_READ.labels(preparation=preparation).set(rows_read)
    PREPARATION_ROWS_REJECTED.labels(preparation=preparation).set(rows_rejected)


def preparation_ended(preparation: str) -> None:
    """Removes the preparation's series (a no-op for one that never reported progress)."""
    for gauge in _PER_PREPARATION:
        try:
            gauge.remove(preparation)
        except KeyError:
            pass

# Every label value exists from the start (at 0), so rates and alerts see a series before the first event.
for _reason in REASONS:
    ROWS_REJECTED.labels(reason=_reason)
for _state in ("pending", "running", "succeeded", "failed", "cancelled"):
    PREPARATIONS.labels(state=_state)
for _state in ("pending", "running"):
    PREPARATIONS_ACTIVE.labels(state=_state)
