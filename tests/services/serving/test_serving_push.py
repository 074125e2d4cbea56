"""Adapters pushed as bytes (AdapterService.PushAdapter) through the registry, without an
inference engine: the engine loads exactly the files pushed, from a directory named like
serving's scratch (so a killed server's is removed at the next start) that is gone once the
push returns; a new version replaces the previous one, and the same files pushed again change
nothing; bad files are refused before the engine, naming `files`. The real-vLLM path is in
test_serving_rollout.py."""

from __future__ import annotations

import asyncio
import json
import pathlib
from dataclasses import dataclass

import pytest

from libs.common.errors import FailedPrecondition, InvalidArgument
from services.serving.adapters import AdapterRegistry, State
from services.serving.scratch import PREFIX


@dataclass(frozen=True)
class FakeLora:
    lora_name: str
    lora_int_id: int
    lora_path: str


class ReadingEngine:
    """Implements the registry's LoraEngine protocol; keeps what each load's files held."""

    def __init__(self):
        self.loads: list[tuple[pathlib.Path, dict[str, bytes]]] = []
        self.removed: list[int] = []

    async def add_lora(self, name, path):
        path = pathlib.Path(path)
        self.loads.append((path, {p.name: p.read_bytes() for p in sorted(path.iterdir())}))
        return FakeLora(f"{name}@{len(self.loads)}", len(self.loads), f"/held/{len(self.loads)}")

    async def first_request(self, lora):
        pass

    async def remove_lora(self, lora):
        self.removed.append(lora.lora_int_id)


def files(base: pathlib.Path, rank: int = 8, weights: bytes = b"w1") -> dict[str, bytes]:
    return {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16,
                                               "target_modules": ["q_proj"],
                                               "base_model_name_or_path": str(base)}).encode(),
            "adapter_model.safetensors": weights}


@pytest.fixture
def base(tmp_path) -> pathlib.Path:
    (tmp_path / "base").mkdir()
    return tmp_path / "base"


def test_a_push_loads_exactly_its_files_and_a_new_version_replaces_it(base):
    engine = ReadingEngine()
    registry = AdapterRegistry(engine, base, "base-model", max_lora_rank=16, adapter_root=base / "root")

    async def run():
        first = await registry.push("job-7", files(base, weights=b"v1"))
        second = await registry.push("job-7", files(base, weights=b"v2"))
        # The same files again (another rank of the job pushing the same policy): nothing changes.
        assert await registry.push("job-7", files(base, weights=b"v2")) == second
        return first, second

    first, second = asyncio.run(run())
    assert [loaded for _, loaded in engine.loads] == [files(base, weights=b"v1"), files(base, weights=b"v2")]
    for directory, _ in engine.loads:
        assert directory.name.startswith(PREFIX) and not directory.exists()
    assert (first.state, first.path, first.rank) == (State.READY, "/held/1", 8)
    assert (second.state, second.path) == (State.READY, "/held/2")
    assert engine.removed == [1]  # the previous version left the engine (no request held it)
    assert [view.name for view in registry.list()] == ["job-7"]


@pytest.mark.parametrize("pushed, error, message", [
    ({"adapter_model.safetensors": b"w"}, InvalidArgument, "no adapter_config.json among the files"),
    ({"adapter_config.json": b"{}"}, InvalidArgument, "no weights (adapter_model.safetensors or adapter_model.bin)"),
    ({"../adapter_config.json": b"{}"}, InvalidArgument, "'../adapter_config.json' is not a file of a PEFT adapter"),
    ({"adapter_config.json": b"{", "adapter_model.safetensors": b"w"}, FailedPrecondition, "is not readable JSON"),
    ("rank 32", FailedPrecondition, "the pushed adapter has LoRA rank 32, above this server's --max_lora_rank 16"),
    ("other base", FailedPrecondition, "the pushed adapter was trained on /elsewhere, but this server serves"),
])
def test_bad_pushes_are_refused_before_the_engine_naming_files(base, pushed, error, message):
    if isinstance(pushed, str):
        pushed = {"rank 32": files(base, rank=32), "other base": files(pathlib.Path("/elsewhere"))}[pushed]
    engine = ReadingEngine()
    registry = AdapterRegistry(engine, base, "base-model", max_lora_rank=16)
    with pytest.raises(error) as refused:
        asyncio.run(registry.push("job-7", pushed))
    assert refused.value.field == "files"
    assert message in refused.value.message
    assert PREFIX not in refused.value.message  # the server's own directory means nothing to the caller
    assert engine.loads == [] and registry.list() == []
