"""Fixtures of the serving tests: the session's serving process (from the shared
`stack`: one vLLM engine for the whole session) and real PEFT LoRA adapters on
the served base model, published like the trainer publishes checkpoints."""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Callable

import pytest

from libs.common import checkpoint
from libs.common.errors import FailedPrecondition


@dataclass
class Serving:
    http: str  # http://127.0.0.1:PORT
    grpc: str  # 127.0.0.1:PORT (admin AdapterService)
    model_dir: pathlib.Path
    base_name: str


@pytest.fixture(scope="session")
def serving(stack) -> Serving:
    import openai

    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="unused")
    base_name = client.models.list().data[0].id
    return Serving(http=stack.serving_http, grpc=stack.serving_grpc, model_dir=pathlib.Path(stack.model_dir),
                   base_name=base_name)


def build_lora(model_dir: pathlib.Path, out: pathlib.Path, rank: int, seed: int,
               modules_to_save: list[str] | None = None, record_base: str | None = None) -> pathlib.Path:
    """A PEFT LoRA on `model_dir` whose B matrices are random (PEFT starts them at zero,
    which would equal the base), saved with save_pretrained plus an ms-swift style
    args.json naming the base model, and published atomically with a manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules="all-linear", modules_to_save=modules_to_save,
        task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)

    def fill(tmp: pathlib.Path) -> None:
        peft_model.save_pretrained(tmp)
        (tmp / "args.json").write_text(json.dumps({"model": record_base or str(model_dir), "lora_rank": rank}))

    return checkpoint.publish(out, fill)


@pytest.fixture(scope="session")
def make_lora(serving, tmp_path_factory) -> Callable[..., pathlib.Path]:
    """make_lora(name, rank=8, seed=1, step=1, **kw) -> a published checkpoint dir
    RUN/name/checkpoint-<step> of a LoRA on the served base model; built once per arguments."""
    root = tmp_path_factory.mktemp("loras")
    built: dict[tuple, pathlib.Path] = {}

    def make(name: str, rank: int = 8, seed: int = 1, step: int = 1, **kwargs) -> pathlib.Path:
        key = (name, rank, seed, step, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in built:
            built[key] = build_lora(serving.model_dir, root / name / f"checkpoint-{step}", rank, seed, **kwargs)
        return built[key]

    return make


# -- without an engine: real adapter directories, and an engine that records ----------------


@dataclass(frozen=True)
class FakeLora:
    lora_name: str
    lora_int_id: int
    lora_path: str


class RecordingEngine:
    """Implements the registry's LoraEngine protocol; records what is loaded."""

    def __init__(self):
        self.loaded: dict[int, FakeLora] = {}
        self.next_id = 0
        self.fail_with: str | None = None
        self.first_requests: list[str] = []  # the lora names run once before serving
        self.fail_first_request_with: str | None = None

    async def add_lora(self, name, path):
        if self.fail_with:
            raise FailedPrecondition(self.fail_with, field="path")
        self.next_id += 1
        lora = FakeLora(f"{name}@{self.next_id}", self.next_id, str(path))
        self.loaded[lora.lora_int_id] = lora
        return lora

    async def first_request(self, lora):
        self.first_requests.append(lora.lora_name)
        if self.fail_first_request_with:
            raise FailedPrecondition(self.fail_first_request_with, field="path")

    async def remove_lora(self, lora):
        del self.loaded[lora.lora_int_id]

    def paths(self) -> list[str]:
        return sorted(lora.lora_path for lora in self.loaded.values())


def _publish_adapter(path: pathlib.Path, base: pathlib.Path, rank: int = 8, weights: bytes = b"w1",
                    modules_to_save=None, args: bool = True) -> pathlib.Path:
    def fill(tmp: pathlib.Path) -> None:
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"],
            "base_model_name_or_path": str(base), "modules_to_save": modules_to_save}))
        (tmp / "adapter_model.safetensors").write_bytes(weights)
        if args:
            (tmp / "args.json").write_text(json.dumps({"model": str(base)}))

    return checkpoint.publish(path, fill)


@pytest.fixture(scope="session")
def recording_engine():
    """Implements the registry's LoraEngine protocol and records what is loaded: for the
    registry's own bookkeeping. The real-vLLM path runs in test_serving_admin.py."""
    return RecordingEngine


@pytest.fixture(scope="session")
def publish_adapter():
    """publish_adapter(path, base, rank=8, weights=b"w1", modules_to_save=None, args=True) -> path:
    an adapter directory as PEFT and ms-swift write it (the weights file is opaque bytes,
    never loaded), published with a manifest."""
    return _publish_adapter

