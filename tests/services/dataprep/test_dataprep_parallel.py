"""--num_proc workers: results in order, and a worker that dies (OOM killer, a crash in
native code) ends the run with one clear error, not a raw BrokenProcessPool."""

import os

import grpc
import pytest

from libs.common.errors import status_code
from services.dataprep import parallel


def test_results_come_in_input_order_with_several_processes():
    assert list(parallel.map_ordered(abs, [-3, 1, -2, 5, -8], 2)) == [3, 1, 2, 5, 8]


def test_a_worker_that_dies_is_one_clear_resource_exhausted_error():
    # os._exit(3) in the worker: the process ends without a result, as under the OOM killer
    with pytest.raises(parallel.WorkerDied) as caught:
        list(parallel.map_ordered(os._exit, [3, 3, 3], 2))
    message = str(caught.value)
    assert "\n" not in message and "--num_proc worker process died" in message
    assert "BrokenProcessPool" not in message
    assert status_code(caught.value) == grpc.StatusCode.RESOURCE_EXHAUSTED


# Runs in a fresh interpreter, so that no other test's threads (servers, the tokenizer's Rust
# thread pool started by a multi-row encode_batch) share the CPU times it reads.
ONE_CORE = r"""
import json, time
from libs.default_model.resolve import resolve_model
from services.dataprep import formats, inputs, pipeline, template
from services.dataprep.config import PrepareConfig

tokenizer = template.load_tokenizer(resolve_model(None), "qwen")
say = "The compiler reads the source once, builds a tree and then walks it to emit code. " * 6
tools = json.dumps([{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])
call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}? " + say},
                      {"role": "assistant", "content": say}, {"role": "user", "content": "More?"},
                      {"role": "assistant", "content": say + str(i)}]} if i % 3 else
        {"messages": [{"role": "user", "content": f"{i}+2?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "4"}, {"role": "assistant", "content": say}], "tools": tools}
        for i in range(500)]
records = [inputs.Record("data.jsonl", i + 1, "", data=json.dumps(row).encode()) for i, row in enumerate(rows)]
config = PrepareConfig(dataset=["data.jsonl"], output_dir="out", template="qwen")
columns = formats.parse_columns(None)
pipeline.encode_chunk(tokenizer, records[:100], columns, config)  # the reference checks of the first rows
time.sleep(0.2)  # idle pool threads, if any, stop spinning
process, thread = time.process_time(), time.thread_time()
results = pipeline.encode_chunk(tokenizer, records[100:], columns, config)
print(json.dumps({"thread": time.thread_time() - thread, "process": time.process_time() - process,
                  "kept": sum(type(r).__name__ == "Example" for r in results)}))
"""


def test_a_process_tokenizes_on_one_core_so_num_proc_counts_cores():
    """What a --num_proc worker (or the one process at --num_proc 1) runs, encode_chunk, spends
    its CPU time on the calling thread: the fast tokenizer's multi-threaded encode_batch would
    put about half of it on its Rust pool's threads, making N processes use more than N cores."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[3]
    pythonpath = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # Bazel's packages too
    done = subprocess.run([sys.executable, "-c", ONE_CORE], capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": pythonpath, "RAYON_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    times = json.loads(done.stdout.strip().splitlines()[-1])
    assert times["kept"] == 400
    assert times["process"] - times["thread"] <= 0.05 * times["thread"], times
