"""How an online method's completions of one optimizer step are split into micro-batches: by
length, so that a micro-batch pads its rows to a length close to theirs.

A rollout's completions differ in length (a group's completions from a few tokens to
--max_completion_length, prompts of their own lengths), and a micro-batch right-pads every row to
its longest: 16 completions of the GRPO benchmark in one micro-batch were 32% padding, and every
padded position costs a forward and a backward like a real one. Sorted by length and cut where
the padding saved outweighs the cost of one more forward, the same step trains on fewer padded
tokens. The losses are normalised by the step's totals (services.trainer.methods), so the update
is the same whichever rows share a micro-batch.

The cut is the least `padded tokens + MICRO_BATCH_TOKENS x micro-batches` (dynamic programming
over the sorted lengths), with at most `max_rows` rows a micro-batch (--per_device_train_batch_size:
never more rows, nor more padded tokens, than the plain layout's largest micro-batch)."""

from __future__ import annotations

# What one more micro-batch costs, in padded tokens: its forward and backward's fixed cost (Python,
# kernel launches, the optimizer-independent per-call work). Measured on this CPU (default model,
# LoRA, 16 completions of the GRPO benchmark): costs of 64 and 256 gave 4 and 2 micro-batches and
# trained a step in 0.34 s and 0.37 s against 0.60 s for one.
MICRO_BATCH_TOKENS = 64


def _sorted(lengths: list[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (lengths[i], i))


def length_groups(lengths: list[int], max_rows: int, count: int | None = None) -> list[list[int]]:
    """The rows (indices into `lengths`) of each micro-batch, shortest first, each sorted by
    length. `count`: exactly that many micro-batches (at most one a row; ranks agreeing on one
    count, see `agreed_count`); None: as many as cost least."""
    if max_rows < 1:
        raise ValueError(f"max_rows: expected at least 1; got {max_rows}")
    order = _sorted(lengths)
    n = len(order)
    if n == 0:
        return []
    sizes = [lengths[i] for i in order]
    cuts = _cuts(sizes, max_rows) if count is None else _cuts_exactly(sizes, max_rows, count)
    return [order[start:end] for start, end in zip([0, *cuts[:-1]], cuts)]


def _cuts(sizes: list[int], max_rows: int) -> list[int]:
    """End positions of the cheapest split of the sorted `sizes` (padded tokens + the fixed cost
    of each micro-batch)."""
    n = len(sizes)
    best = [0] + [float("inf")] * n
    start = [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(max(0, end - max_rows), end):
            cost = best[begin] + (end - begin) * sizes[end - 1] + MICRO_BATCH_TOKENS
            if cost < best[end]:
                best[end], start[end] = cost, begin
    return _walk(start, n)


def _cuts_exactly(sizes: list[int], max_rows: int, count: int) -> list[int]:
    """End positions of the split of the sorted `sizes` into exactly `count` micro-batches (as
    close to it as `max_rows` and one row each allow) with the fewest padded tokens."""
    n = len(sizes)
    count = max(-(-n // max_rows), min(count, n))
    inf = float("inf")
    best = [0.0] + [inf] * n  # best[end] with p parts, p = 0
    starts = []
    for _ in range(count):
        nxt, start = [inf] * (n + 1), [0] * (n + 1)
        for end in range(1, n + 1):
            for begin in range(max(0, end - max_rows), end):
                if best[begin] == inf:
                    continue
                cost = best[begin] + (end - begin) * sizes[end - 1]
                if cost < nxt[end]:
                    nxt[end], start[end] = cost, begin
        best = nxt
        starts.append(start)
    ends, end = [], n
    for start in reversed(starts):
        ends.append(end)
        end = start[end]
    return ends[::-1]


def _walk(start: list[int], n: int) -> list[int]:
    ends, end = [], n
    while end:
        ends.append(end)
        end = start[end]
    return ends[::-1]


def padded_tokens(lengths: list[int], groups: list[list[int]]) -> int:
    """The tokens the micro-batches hold, padding included (each row padded to its group's longest)."""
    return sum(len(group) * max(lengths[i] for i in group) for group in groups if group)
