"""A disk that fills while the running serving process (the session's, with its vLLM engine)
takes its hold on an adapter's files: the adapter lives on another file system (/dev/shm), so
the hold copies it, and a file-size limit (RLIMIT_FSIZE) put on the serving process for the
one call stops the copy. LoadAdapter fails with RESOURCE_EXHAUSTED naming the held directory,
the adapter is listed FAILED and not served, no half copy is left, and once there is room the
same adapter loads and answers."""

from __future__ import annotations

import os
import pathlib
import re
import resource
import shutil
import tempfile

import grpc
import openai
import pytest

from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.scratch import PREFIX

pytestmark = pytest.mark.slow

SHM = pathlib.Path("/dev/shm")
LIMIT = 64 << 10  # the adapter's config fits; its weights (~300 kB) do not


@pytest.fixture
def elsewhere(make_lora, tmp_path):
    """A published adapter on a file system other than the serving scratch's."""
    if not SHM.is_dir() or SHM.stat().st_dev == pathlib.Path(tempfile.gettempdir()).stat().st_dev:
        pytest.skip(f"needs a file system other than {tempfile.gettempdir()}'s for the adapter (/dev/shm)")
    target = SHM / f"tuneforge-test-{os.getpid()}" / "checkpoint-1"
    shutil.copytree(make_lora("ada", rank=8, seed=1), target)
    assert (target / "adapter_model.safetensors").stat().st_size > LIMIT
    yield target
    shutil.rmtree(target.parent)


def test_a_full_disk_fails_the_load_with_resource_exhausted_and_leaves_nothing(stack, serving, elsewhere):
    pid = stack.stack.processes["serving"].popen.pid
    (scratch,) = pathlib.Path(tempfile.gettempdir()).glob(f"{PREFIX}{pid}-*")
    held_before = set((scratch / "adapters").iterdir())
    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)
    with grpc.insecure_channel(serving.grpc) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)
        load = serving_pb2.LoadAdapterRequest(name="full-disk", path=str(elsewhere))
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (LIMIT, hard))
        try:
            with pytest.raises(grpc.RpcError) as refused:
                admin.LoadAdapter(load, timeout=60)
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = refused.value.details()
        assert re.fullmatch(rf"no space to write {scratch}/adapters/\d+: File too large \(EFBIG\); holding the "
                            rf"engine's copy of {elsewhere}; free space in {tempfile.gettempdir()}", message), message
        assert set((scratch / "adapters").iterdir()) == held_before  # no half copy
        (failed,) = [a for a in admin.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters
                     if a.name == "full-disk"]
        assert failed.state == serving_pb2.ADAPTER_STATE_FAILED and failed.error == message
        assert "full-disk" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="full-disk", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)

        # room again: the same adapter loads whole and answers
        assert admin.LoadAdapter(load, timeout=60).adapter.state == serving_pb2.ADAPTER_STATE_READY
        answer = client.chat.completions.create(model="full-disk", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0)
        assert answer.choices[0].message.content
        admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="full-disk"), timeout=10)
