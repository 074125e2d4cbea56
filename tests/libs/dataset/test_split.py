"""The eval split by row identity: which rows are held out and how many each side and rank gets."""

import math

import numpy as np
from hypothesis import given, settings, strategies as st

from libs.dataset import split
from libs.dataset.split import Holdout


def test_held_out_rows_are_exactly_ceil_n_r_and_spread():
    for ratio in (0.01, 0.1, 0.25, 0.3, 0.5):
        for rows in (1, 7, 8, 100):
            held = [i for i in range(rows) if split.held_out(i, ratio)]
            assert len(held) == split.held_out_rows(rows, ratio) == math.ceil(rows * ratio)
            assert held[0] == 0
    assert [i for i in range(8) if split.held_out(i, 0.25)] == [0, 4]
    assert [i for i in range(10) if split.held_out(i, 0.3)] == [0, 3, 6]
    assert not any(split.held_out(i, 0.0) for i in range(10)) and split.held_out_rows(10, 0.0) == 0


@settings(max_examples=settings().max_examples // 2)
@given(rows=st.integers(0, 5000), ratio=st.floats(1e-6, 0.999), offset=st.integers(0, 2**40))
def test_the_mask_agrees_with_the_rule_and_the_counts(rows, ratio, offset):
    ids = np.arange(rows, dtype=np.int64)
    mask = split.held_out_mask(ids, ratio)
    assert int(mask.sum()) == split.held_out_rows(rows, ratio)
    assert mask.tolist() == [split.held_out(i, ratio) for i in range(rows)]
    far = ids[:50] + offset  # ids far into a big dataset: the vectorised and scalar forms still agree
    assert split.held_out_mask(far, ratio).tolist() == [split.held_out(int(i), ratio) for i in far]
    sides = Holdout(ratio, True), Holdout(ratio, False)
    assert sides[0].rows(rows) + sides[1].rows(rows) == rows
    assert (sides[0].keeps(ids) != sides[1].keeps(ids)).all()


def test_rank_rows_deal_round_robin():
    for rows in (0, 1, 5, 6, 7):
        for world_size in (1, 2, 3):
            counts = [split.rank_rows(rows, rank, world_size) for rank in range(world_size)]
            assert counts == [len(range(rank, rows, world_size)) for rank in range(world_size)]
            assert sum(counts) == rows and max(counts) - min(counts) <= 1
    assert [split.rank_rows(7, rank, 3) for rank in range(3)] == [3, 2, 2]
