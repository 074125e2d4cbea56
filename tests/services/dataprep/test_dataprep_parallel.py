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
