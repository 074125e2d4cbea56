"""Packing tokenized samples into rows of at most `max_length` tokens by
best-fit-decreasing, and the columns a packed row carries (position_ids that
restart at 0 for each sample, seq_lens). Pure functions, no I/O."""

from __future__ import annotations

import bisect
import heapq


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices. Items are placed longest first (ties in index order),
    each in the bin with the least room left that still holds it (ties: the oldest
    bin), else in a new bin. Bins come in creation order, items in placement order.
    Deterministic: the same lengths always give the same bins.

    Rooms are kept as a sorted list of distinct free-space values (at most
    `capacity` of them) with a heap of bin ids each, so a placement costs a bisect."""
    if capacity < 1:
        raise ValueError(f"capacity: expected a positive number; got {capacity}")
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"item {too_long[0]} has length {lengths[too_long[0]]} > capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []                   # free[b]: room left in bin b
    levels: list[int] = []                 # sorted distinct room values that some bin has
    holders: dict[int, list[int]] = {}     # room -> heap of bin ids with that room
    for i in order:
        need = lengths[i]
        at = bisect.bisect_left(levels, need)
        if at < len(levels):
            room = levels[at]
            b = heapq.heappop(holders[room])
            if not holders[room]:
                del holders[room]
                levels.pop(at)
        else:
            b, room = len(bins), capacity
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        room -= need
        free[b] = room
        if room > 0:
            if room not in holders:
                holders[room] = []
                bisect.insort(levels, room)
            heapq.heappush(holders[room], b)
    return bins


def position_ids(seq_lens: list[int]) -> list[int]:
    """0..n-1 for each sample in turn."""
    return [p for n in seq_lens for p in range(n)]


def efficiency(tokens: int, bins: int, max_length: int) -> float:
    """Real tokens over the slots of `bins` rows of `max_length` (1.0 when nothing was packed)."""
    return tokens / (bins * max_length) if bins else 1.0
