"""Running one function over a stream of chunks in worker processes (`--num_proc`),
results in input order, with a bounded number of chunks in flight so memory
stays flat whatever the stream's length."""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from libs.common.errors import ResourceExhausted

T = TypeVar("T")
R = TypeVar("R")

# imported once by the fork server, so workers start without importing transformers (seconds) again
PRELOAD = ["services.dataprep.pipeline", "transformers.tokenization_utils_tokenizers"]
IN_FLIGHT_PER_PROCESS = 2  # chunks queued per worker: enough to keep each busy, few enough to bound memory


class WorkerDied(ResourceExhausted):
    """A worker process ended without a result: most often the kernel's OOM killer,
    so RESOURCE_EXHAUSTED over gRPC."""


def start_early(num_proc: int) -> None:
    """Starts the fork server now (it imports PRELOAD, seconds) when num_proc > 1, so that
    it does so while this process loads the tokenizer rather than after."""
    if num_proc > 1:
        from multiprocessing import forkserver

        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()


def map_ordered(work: Callable[[T], R], chunks: Iterable[T], num_proc: int,
                initializer: Callable[..., None] | None = None, initargs: tuple = ()) -> Iterator[R]:
    """work(chunk) for each chunk, yielded in the chunks' order. num_proc 1 runs in this
    process (no initializer); more runs in worker processes, each set up once by
    initializer(*initargs). `work`, `initializer` and `initargs` are pickled (a fast
    tokenizer pickles in milliseconds).

    Workers come from a fork server that imported PRELOAD once: fork from this
    process is unsafe (a gRPC server's threads crashed forked workers), and spawn
    imports transformers again in every worker, seconds each."""
    if num_proc <= 1:
        for chunk in chunks:
            yield work(chunk)
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    pool = concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context, initializer=initializer,
                                                  initargs=initargs)
    pending: collections.deque[concurrent.futures.Future] = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(work, chunk))
            if len(pending) >= num_proc * IN_FLIGHT_PER_PROCESS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        # a worker died (killed, out of memory, a crash in native code): say so in one line
        raise WorkerDied(f"a --num_proc worker process died unexpectedly (killed, out of memory, or a crash in "
                         f"native code); retry with a smaller --num_proc, or --num_proc 1 to see the error") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
