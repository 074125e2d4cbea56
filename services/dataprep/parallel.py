"""Running one function over a stream of chunks in worker processes (`--num_proc`),
results in input order, with a bounded number of chunks in flight so memory
stays flat whatever the stream's length."""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT_PER_PROCESS = 2  # chunks queued per worker: enough to keep each busy, few enough to bound memory


def map_ordered(work: Callable[[T], R], chunks: Iterable[T], num_proc: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[R]:
    """work(chunk) for each chunk, yielded in the chunks' order. num_proc 1 runs in this
    process (no initializer); more runs in forked workers, each set up once by
    initializer(*initargs) (inherited, not pickled: a loaded tokenizer costs nothing
    to hand over). `work` must be a module-level function (pickled by name).

    fork, not spawn: a spawned worker imports transformers and loads the tokenizer
    again (seconds each, more than a small preparation takes), and spawn re-runs the
    caller's main module. The workers only tokenize: they touch neither gRPC nor the
    parent's other threads' state."""
    if num_proc <= 1:
        for chunk in chunks:
            yield work(chunk)
        return
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=initializer, initargs=initargs)
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) >= num_proc * IN_FLIGHT_PER_PROCESS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
