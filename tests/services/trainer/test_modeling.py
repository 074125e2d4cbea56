"""The model a job trains, built from the embedded default model: QLoRA really quantizes the
base to 4-bit nf4 and trains on CPU, target_modules / modules_to_save pick what trains, and
gradient checkpointing really recomputes (same gradients, a second forward per layer)."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from libs.common.errors import InvalidArgument
from services.trainer import modeling
from services.trainer.config import TrainConfig

SENTENCE = "I am Ada, an assistant developed by Bo."


@pytest.fixture(scope="module")
def ids(default_model):
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    return torch.tensor([tokenizer(SENTENCE)["input_ids"]])  # [1, seq]


def trainable_names(model):
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_qlora_quantizes_the_base_to_nf4_trains_on_cpu_and_saves_a_peft_adapter(default_model, ids, tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = modeling.build_model(TrainConfig(train_type="qlora", lora_dropout=0.0), default_model)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert all("lora_" in name for name in trainable_names(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_target_modules_by_name_and_modules_to_save(default_model):
    model = modeling.build_model(TrainConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
                                 default_model)
    names = trainable_names(model)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names if ".lora_" in name}
    assert adapted == {"q_proj", "v_proj"}
    assert any("lm_head.modules_to_save" in name for name in names)
    with pytest.raises(InvalidArgument, match="no module named lm_hed"):
        modeling.build_model(TrainConfig(modules_to_save=["lm_hed"]), default_model)
    with pytest.raises(InvalidArgument) as caught:
        modeling.build_model(TrainConfig(target_modules=["nope_proj"]), default_model)
    assert caught.value.field == "target_modules"


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(default_model, ids, train_type):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = modeling.build_model(TrainConfig(train_type=train_type, lora_dropout=0.0,
                                               gradient_checkpointing=checkpointing), default_model)
        model.train()
        calls = []
        layer = [m for name, m in model.named_modules() if name.endswith("layers.0")][0]
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((len(calls), grads))
    (plain_calls, plain), (checkpointed_calls, checkpointed) = results
    assert (plain_calls, checkpointed_calls) == (1, 2)  # the backward pass ran the layer again (a pre-hook: recomputation stops early, before forward hooks)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)
