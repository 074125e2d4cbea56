"""The `--engine ray` back end: chunks of raw records decoded, format-detected and
tokenized as Ray Data tasks (a local Ray runtime, or a cluster at --ray_address),
their results handed back in input order, window by window, so the driver packs
and writes shards exactly as the local engine does with bounded memory."""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import pickle
import queue
import socket
import threading
from typing import Iterable, Iterator

from libs.common.errors import Unavailable
from services.dataprep.config import PrepareConfig

WINDOW_CHUNKS_PER_CPU = 4  # chunks per Ray Data window per CPU: enough to keep every worker busy, bounded memory
MIN_WINDOW_CHUNKS = 8

log = logging.getLogger(__name__)


class RayRun:
    """One run's view of the cluster: chunks encoded per worker ("node-id-prefix host:pid"),
    for the log and for tests showing that every node did work."""

    def __init__(self):
        self.chunks_by_worker: collections.Counter[str] = collections.Counter()
        self.nodes: set[str] = set()


LAST_RUN = RayRun()  # the most recent run in this process (tests and the log read it; no output file does)


_RUNTIME = {"users": 0, "ours": False}  # preparations using Ray in this process; whether we started it
_RUNTIME_LOCK = threading.Lock()


@contextlib.contextmanager
def runtime(config: PrepareConfig) -> Iterator[None]:
    """A Ray runtime for one preparation: the one already initialised in this process
    (a caller's is left running), else a connection to --ray_address, else a local
    runtime of --num_proc CPUs without a dashboard; ours is shut down when the last
    preparation using it (a service may run several) ends."""
    import ray
    import ray.exceptions

    with _RUNTIME_LOCK:
        if not ray.is_initialized():
            try:
                if config.ray_address:
                    ray.init(address=config.ray_address, logging_level=logging.WARNING, log_to_driver=False)
                else:
                    ray.init(num_cpus=config.num_proc, include_dashboard=False, logging_level=logging.WARNING,
                             log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
                where = f"the Ray cluster at {config.ray_address}" if config.ray_address else "a local Ray runtime"
                raise Unavailable(f"cannot connect to {where}: {str(exc).splitlines()[0]}",
                                  field="ray_address" if config.ray_address else "engine") from None
            _RUNTIME["ours"] = True
        _RUNTIME["users"] += 1
    try:
        yield
    finally:
        with _RUNTIME_LOCK:
            _RUNTIME["users"] -= 1
            if not _RUNTIME["users"] and _RUNTIME["ours"]:
                ray.shutdown()
                _RUNTIME["ours"] = False


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


_TOKENIZERS: dict = {}  # in a Ray worker process: tokenizer object ref -> tokenizer, fetched once per process


def _encode_batch(batch: dict, tokenizer_ref, config: PrepareConfig) -> dict:
    """Ray task: each chunk of pickled records -> the pickled results of the same
    row-tokenizing function the local engine runs (pipeline.encode_chunk), and the
    worker that ran it."""
    import ray

    from services.dataprep import formats, pipeline

    key = tokenizer_ref.hex()
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = (ray.get(tokenizer_ref), formats.parse_columns(config.columns))
    tokenizer, columns = _TOKENIZERS[key]
    worker = f"{ray.get_runtime_context().get_node_id()[:12]} {socket.gethostname()}:{os.getpid()}"
    results = [pickle.dumps(pipeline.encode_chunk(tokenizer, pickle.loads(chunk), columns, config),
                            protocol=pickle.HIGHEST_PROTOCOL) for chunk in batch["chunk"]]
    return {"index": batch["index"], "results": results, "worker": [worker] * len(results)}


def _windows(chunks: Iterable[list], size: int) -> Iterator[list[list]]:
    window = []
    for chunk in chunks:
        window.append(chunk)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def map_ordered(chunks: Iterable[list], tokenizer, config: PrepareConfig) -> Iterator[list]:
    """pipeline.encode_chunk(tokenizer, chunk, ...) for each chunk on Ray Data, yielded in
    the chunks' order. Chunks go to Ray a window at a time (a Dataset of WINDOW chunks,
    one block each, so each is its own task); a thread runs the windows one after another
    into a bounded queue so the next window is tokenizing while this one is packed and
    written. Memory: a window of raw chunks and at most two windows of results."""
    import ray
    import ray.data

    run = LAST_RUN
    run.chunks_by_worker.clear()
    run.nodes.clear()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results in input order (also sorted below)
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    window_size = max(MIN_WINDOW_CHUNKS, _cluster_cpus() * WINDOW_CHUNKS_PER_CPU)
    tokenizer_ref = ray.put(tokenizer)
    done = object()
    results: queue.Queue = queue.Queue(maxsize=window_size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            start = 0
            for window in _windows(chunks, window_size):
                items = [{"index": start + i, "chunk": pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)}
                         for i, chunk in enumerate(window)]
                start += len(window)
                dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
                    _encode_batch, batch_size=1, fn_kwargs={"tokenizer_ref": tokenizer_ref, "config": config},
                    num_cpus=1)
                # preserve_order keeps rows in order; sorting a window's few rows makes it certain
                encoded = sorted(dataset.iter_rows(), key=lambda row: int(row["index"]))
                for row in encoded:
                    run.chunks_by_worker[str(row["worker"])] += 1
                    run.nodes.add(str(row["worker"]).split(" ")[0])
                    if not put(pickle.loads(row["results"])):
                        return
            put(done)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(exc)

    thread = threading.Thread(target=produce, name="ray-engine", daemon=True)
    thread.start()
    try:
        while True:
            item = results.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise _clear(item)
            yield item
    finally:
        stop.set()
        thread.join()
        if run.chunks_by_worker:
            log.info("ray engine: chunks per worker %s", dict(sorted(run.chunks_by_worker.items())))


@contextlib.contextmanager
def session(chunks: Iterable[list], tokenizer, config: PrepareConfig) -> Iterator[Iterator[list]]:
    """map_ordered inside a Ray runtime for one preparation (see runtime()): the results'
    iterator, closed (its thread joined) before the runtime goes."""
    with runtime(config):
        encoded = map_ordered(chunks, tokenizer, config)
        try:
            yield encoded
        finally:
            encoded.close()


def _clear(exc: BaseException) -> BaseException:
    """A lost worker or node as one line (UNAVAILABLE); anything else (ours, a bug) passes through."""
    import ray.exceptions

    if isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ActorDiedError, ray.exceptions.OutOfMemoryError)):
        return Unavailable(f"engine: a Ray worker or node was lost during the preparation "
                           f"({type(exc).__name__}); retry, or use --engine local")
    return exc
