"""--packing true: best-fit-decreasing bins, packed rows that split back into exactly
the unpacked samples, position_ids restarting per sample, efficiency reported."""

import random

import pyarrow as pa
import pytest

from libs.common.errors import Problems
from services.dataprep import metrics, packing, pipeline
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare


def read_rows(out, manifest):
    rows = []
    for shard in manifest["shards"]:
        rows += pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all().to_pylist()
    return rows


def test_best_fit_decreasing_spelled_out():
    # longest first: 7 -> new bin 0 (room 3); 5 -> new bin 1 (room 5); 4 -> bin 1, the tightest
    # fit (room 1); 3 -> bin 0 (room 0); 2 -> fits nowhere, new bin 2; 1 -> bin 1 (room 0)
    assert packing.best_fit_decreasing([5, 3, 7, 2, 4, 1], 10) == [[2, 1], [0, 4, 5], [3]]
    # equal rooms: the oldest bin wins; equal lengths: index order
    assert packing.best_fit_decreasing([6, 6, 2], 8) == [[0, 2], [1]]
    assert packing.best_fit_decreasing([], 8) == []
    with pytest.raises(ValueError, match="item 1 has length 9 > capacity 8"):
        packing.best_fit_decreasing([1, 9], 8)


def test_best_fit_decreasing_places_every_item_once_within_capacity_and_matches_a_naive_bfd():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = packing.best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # the same as the textbook O(n * bins) best-fit-decreasing
    naive: list[list[int]] = []
    for i in sorted(range(500), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(naive)) if sum(lengths[j] for j in naive[b]) + lengths[i] <= 128]
        if fits:
            best = min(fits, key=lambda b: (128 - sum(lengths[j] for j in naive[b]), b))
            naive[best].append(i)
        else:
            naive.append([i])
    assert bins == naive
    assert packing.position_ids([3, 1, 2]) == [0, 1, 2, 0, 0, 1]


def conversations(n):
    rng = random.Random(1)
    return [{"messages": [{"role": "user", "content": f"question {i} " + "word " * rng.randint(0, 30)},
                          {"role": "assistant", "content": f"answer {i} " + "more " * rng.randint(0, 40)}]}
            for i in range(n)]


def test_packed_rows_split_back_into_the_unpacked_samples(tmp_path, write_jsonl):
    data = write_jsonl("train.jsonl", conversations(40))
    plain = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "plain"), max_length=256))
    packed = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "packed"), max_length=256,
                                   packing=True, shard_rows=3))
    samples = read_rows(tmp_path / "plain", plain)
    rows = read_rows(tmp_path / "packed", packed)

    assert set(rows[0]) == {"input_ids", "labels", "position_ids", "seq_lens", "length"}
    assert len(rows) < len(samples)
    pieces = []
    for row in rows:
        assert sum(row["seq_lens"]) == row["length"] == len(row["input_ids"]) == len(row["labels"]) <= 256
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        at = 0
        for n in row["seq_lens"]:
            pieces.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
            at += n
    assert sorted(pieces) == sorted((s["input_ids"], s["labels"]) for s in samples)

    # bins in best-fit-decreasing order of the samples' lengths
    bins = packing.best_fit_decreasing([s["length"] for s in samples], 256)
    assert [row["seq_lens"] for row in rows] == [[samples[i]["length"] for i in b] for b in bins]

    info = packed["packing"]
    assert info == {"max_length": 256, "samples": 40, "bins": len(rows),
                    "efficiency": plain["tokens"] / (len(rows) * 256)}
    assert info["efficiency"] > 0.9
    assert metrics.PACKING_EFFICIENCY._value.get() == info["efficiency"]
    assert (packed["rows_in"], packed["rows_out"], packed["tokens"]) == (40, 40, plain["tokens"])
    assert packed["columns"]["seq_lens"] == "list<item: int32>"
    assert [s["rows"] for s in packed["shards"]][:-1] == [3] * (len(packed["shards"]) - 1)


def test_streaming_packs_each_window_on_its_own(tmp_path, write_jsonl, monkeypatch):
    monkeypatch.setattr(pipeline, "STREAMING_PACK_WINDOW", 10)
    data = write_jsonl("train.jsonl", conversations(25))
    plain = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "plain"), max_length=256))
    manifest = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), max_length=256,
                                     packing=True, streaming=True))
    lengths = [s["length"] for s in read_rows(tmp_path / "plain", plain)]
    expected = []
    for first in (0, 10, 20):
        window = lengths[first:first + 10]
        expected += [[window[i] for i in b] for b in packing.best_fit_decreasing(window, 256)]
    assert [row["seq_lens"] for row in read_rows(tmp_path / "out", manifest)] == expected
    assert manifest["packing"]["samples"] == 25


def test_packing_needs_a_max_length(tmp_path, write_jsonl):
    data = write_jsonl("train.jsonl", conversations(2))
    with pytest.raises(Problems, match="packing: needs max_length > 0"):
        prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "out"), max_length=0, packing=True))


def test_preference_pairs_pack_with_chosen_and_rejected_side_by_side(tmp_path, write_jsonl):
    rng = random.Random(2)
    pairs = [{"messages": [{"role": "user", "content": f"q{i} " + "w " * rng.randint(0, 20)},
                           {"role": "assistant", "content": f"good {i} " + "g " * rng.randint(0, 30)}],
              "rejected_response": f"bad {i} " + "b " * rng.randint(0, 30),
              **({"margin": i / 10} if i % 2 else {})} for i in range(30)]
    too_long = {"messages": [{"role": "user", "content": "long"}, {"role": "assistant", "content": "x " * 100}],
                "rejected_response": "y " * 100}
    data = write_jsonl("pairs.jsonl", [*pairs, too_long])
    plain = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "plain"), max_length=256))
    packed = prepare(PrepareConfig(dataset=[str(data)], output_dir=str(tmp_path / "packed"), max_length=256,
                                   packing=True))
    unpacked = read_rows(tmp_path / "plain", plain)
    assert len(unpacked) == 31 and "chosen_input_ids" in unpacked[0]
    rows = read_rows(tmp_path / "packed", packed)
    assert set(rows[0]) == {"input_ids", "labels", "position_ids", "seq_lens", "margins", "length"}
    assert packed["rejected_by_reason"] == {"too_long": 1}  # each side fits 256, the pair does not
    assert (packed["rows_in"], packed["rows_out"], packed["packing"]["samples"]) == (31, 30, 30)

    found = []
    for row in rows:
        assert len(row["seq_lens"]) == 2 * len(row["margins"]) and sum(row["seq_lens"]) == row["length"] <= 256
        assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]
        at, sequences = 0, []
        for n in row["seq_lens"]:
            sequences.append((row["input_ids"][at:at + n], row["labels"][at:at + n]))
            at += n
        for k, margin in enumerate(row["margins"]):
            found.append((sequences[2 * k], sequences[2 * k + 1], margin))
    expected = [((r["chosen_input_ids"], r["chosen_labels"]), (r["rejected_input_ids"], r["rejected_labels"]),
                 r["margin"]) for r in unpacked[:30]]
    key = lambda t: (t[0], t[1])  # noqa: E731
    assert sorted(found, key=key) == sorted(expected, key=key)
    assert [m for *_, m in expected][:4] == [None, 0.1, None, 0.3]
