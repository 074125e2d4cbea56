"""The published files written one parameter at a time (services.trainer.streamed_save, what
ZeRO-3 and FSDP2 ranks publish through) are those save_pretrained writes for one process: the
same file names, the same config.json and generation_config.json bytes, the same tensors under
the same names (tied embeddings once); past max_shard_size, shards with their index that
transformers loads back; for a PEFT model, the same adapter. The gather here is the identity
(one process); the 2-process back ends are tested in test_distributed.py."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.trainer import streamed_save


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach()


def files(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def model(default_model):
    return AutoModelForCausalLM.from_pretrained(default_model)


def test_a_full_model_is_written_as_save_pretrained_writes_it(model, tmp_path):
    expected, streamed = tmp_path / "save_pretrained", tmp_path / "streamed"
    expected.mkdir(), streamed.mkdir()
    model.save_pretrained(expected)
    streamed_save.write_model(streamed, model, identity)
    assert files(streamed) == files(expected) == ["config.json", "generation_config.json", "model.safetensors"]
    for name in ("config.json", "generation_config.json"):
        assert (streamed / name).read_bytes() == (expected / name).read_bytes()
    mine, theirs = load_file(streamed / "model.safetensors"), load_file(expected / "model.safetensors")
    assert mine.keys() == theirs.keys() and "lm_head.weight" not in mine  # tied to the embeddings: once
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert (streamed / "model.safetensors").stat().st_size == (expected / "model.safetensors").stat().st_size


def test_past_max_shard_size_it_writes_shards_and_an_index_that_transformers_loads(model, tmp_path):
    streamed_save.write_model(tmp_path, model, identity, max_shard_size=2_000_000)
    assert files(tmp_path) == ["config.json", "generation_config.json"] + [
        f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + ["model.safetensors.index.json"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_a_peft_model_gets_the_adapter_save_pretrained_writes(model, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    gathered = []
    expected, streamed = tmp_path / "save_pretrained", tmp_path / "streamed"
    peft_model.save_pretrained(expected)
    streamed_save.write_model(streamed, peft_model, lambda t: gathered.append(t) or identity(t))
    assert len(gathered) == sum(1 for p in peft_model.parameters() if p.requires_grad)  # the base is not gathered
    assert files(streamed) == files(expected)
    assert (streamed / "adapter_config.json").read_bytes() == (expected / "adapter_config.json").read_bytes()
    mine, theirs = (load_file(d / "adapter_model.safetensors") for d in (streamed, expected))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_a_rank_other_than_0_writes_nothing_but_takes_part_in_every_gather(model, tmp_path):
    gathered = []
    streamed_save.write_model(None, model, lambda t: gathered.append(t) and None)
    assert len(gathered) == len(model.state_dict()) - 1  # lm_head.weight is the embeddings
    assert files(tmp_path) == []
