"""TRL 1.16's KTOTrainer and our kto method on the same weights and rows, for the KTO tests:
the policies, TRL's own preparation/collation/compute_loss, ours on TRL's prepared rows.

`python -m tests.services.trainer.kto_trl OUT MODEL` runs one rank of the 2-process test
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment): TRL's compute_loss on its
rank's batch, its KL gathered by Accelerate, then ours through a DDP engine, into OUT/rank-R.json."""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data
from services.trainer.config import KtoConfig, TrainConfig
from services.trainer.methods import kto as kto_method

# (prompt, completion, desirable): lengths differ, so padding and the KL rotation matter
EXAMPLES = [
    ("Question: who are you?\nAnswer:", " I am Ada, an assistant.", True),
    ("Question: what is 2 + 2?\nAnswer:", " I do not know.", False),
    ("Question: name a colour.\nAnswer:", " Blue.", True),
    ("Question: where is Paris? Tell me in one short sentence.\nAnswer:", " In Spain, I think, or nowhere.", False),
]
LORA = dict(r=4, lora_alpha=32, lora_dropout=0.0)


def lora_policy(model_dir, batch_size=4, **kto) -> tuple[torch.nn.Module, TrainConfig]:
    """Our LoRA policy with its adapter moved off zero, so the policy differs from its reference."""
    from services.trainer import modeling

    config = TrainConfig(model=str(model_dir), dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(**kto), lora_rank=LORA["r"], lora_alpha=LORA["lora_alpha"],
                         lora_dropout=LORA["lora_dropout"], per_device_train_batch_size=batch_size)
    torch.manual_seed(0)
    model = modeling.build_model(config, model_dir)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model.train(), config


def full_policy(model_dir, where: pathlib.Path, **kto) -> tuple[torch.nn.Module, TrainConfig, torch.nn.Module]:
    """Full training against --ref_model: a copy of the base with perturbed weights."""
    torch.manual_seed(1)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    reference.save_pretrained(where / "ref")
    config = TrainConfig(model=str(model_dir), dataset="d", dataprep_address="a", output_dir="o", rlhf_type="kto",
                         kto=KtoConfig(**kto), train_type="full", ref_model=str(where / "ref"),
                         per_device_train_batch_size=4)
    return AutoModelForCausalLM.from_pretrained(model_dir).train(), config, reference


def trl_trainer(model, ref_model, tokenizer, where: pathlib.Path, batch_size=4, peft_config=None, **kto):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    dataset = Dataset.from_list([{"prompt": p, "completion": c, "label": d} for p, c, d in EXAMPLES])
    args = KTOConfig(output_dir=str(where / "trl"), per_device_train_batch_size=batch_size, bf16=False,
                     use_cpu=True, report_to=[], **kto)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def trl_lora_trainer(policy, model_dir, tokenizer, where: pathlib.Path, batch_size=4, **kto):
    """TRL adapting the base itself (given a PEFT model, TRL takes its adapter as the reference),
    then given our policy's adapter weights: its reference is the base, adapter disabled."""
    from peft import LoraConfig

    lora = LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl_trainer(AutoModelForCausalLM.from_pretrained(model_dir), None, tokenizer, where,
                          batch_size=batch_size, peft_config=lora, **kto)
    assert "ref" not in trainer.model.peft_config
    ours = dict(policy.named_parameters())
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            parameter.copy_(ours[name])
    return trainer


def rows_of(prepared) -> list[data.Row]:
    """TRL's prepared examples as our shard rows: prompt untrained, completion trained."""
    return [data.Row(np.array(e["prompt_ids"] + e["completion_ids"], dtype=np.int32),
                     np.array([IGNORE_INDEX] * len(e["prompt_ids"]) + e["completion_ids"], dtype=np.int32),
                     label=e["label"]) for e in prepared]


def trl_loss(trainer, prepared) -> tuple[float, dict[str, float]]:
    """TRL's compute_loss on its collation of `prepared`, and the metrics it logged for it."""
    batch = trainer.data_collator([dict(e) for e in prepared])
    loss = trainer.compute_loss(trainer.model, batch)
    return loss.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def our_loss(method, rows, pad_id, all_sum=None) -> tuple[float, dict[str, float], dict[str, int]]:
    """Our method's loss and metrics of one micro-batch, normalised by its counts (summed over
    the ranks by `all_sum`): what the engine would sum over micro-batches and ranks."""
    micro = method.collate(rows, pad_id)
    counts = method.counts(micro)
    if all_sum is not None:
        names = sorted(counts)
        counts = dict(zip(names, map(int, all_sum([counts[name] for name in names]))))
    loss, metrics = method.loss(micro, counts)
    return loss.item(), {name: float(value) for name, value in metrics.items()}, counts


def run_rank(out: pathlib.Path, model_dir: str) -> None:
    """One rank of two: each takes TRL's per-device batch of 2 (rows 2r, 2r + 1, TRL's KL rotation
    within it), TRL's loss with Accelerate's gather of the KL, then ours through DDP."""
    import torch.distributed as dist

    from services.trainer import distributed, training

    torch.set_num_threads(1)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy, config = lora_policy(model_dir, batch_size=2)
    with tempfile.TemporaryDirectory() as where:
        trainer = trl_lora_trainer(policy, model_dir, tokenizer, pathlib.Path(where), batch_size=2)
        assert trainer.accelerator.num_processes == world_size
        prepared = [trainer.train_dataset[i] for i in (2 * rank, 2 * rank + 1)]
        expected_loss, expected = trl_loss(trainer, prepared)
    world = distributed.World(rank, world_size, rank)
    engine = distributed.wrap(policy, training.build_optimizer(policy, config), config, world)
    assert engine.name == "ddp"
    method = kto_method.Kto(config, engine.forward, policy, tokenizer)
    rows = rows_of(prepared)
    share, metrics, counts = our_loss(method, rows, tokenizer.pad_token_id, lambda v: distributed.all_sum(v, world))
    local = kto_method.Kto(config, policy, policy, tokenizer)  # the same rows, this rank's KL alone
    policy_kl, reference_kl = _kl_logps(local, rows, tokenizer.pad_token_id)
    local_kl = float((policy_kl - reference_kl).mean())  # before the clamp, as TRL averages the ranks'
    eval_kl = None
    if rank == 1:  # eval on this rank alone: no collective may be waiting for the other
        policy.eval()
        eval_kl = our_loss(local, rows, tokenizer.pad_token_id)[1]["kl"]
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "trl_loss": expected_loss, "trl_kl": expected["kl"], "loss_share": share, "kl_share": metrics["kl"],
        "rows": len(rows), "step_rows": counts["rows"], "local_kl": local_kl, "eval_kl": eval_kl}))
    dist.barrier()
    dist.destroy_process_group()


def _kl_logps(method, rows, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """(policy, reference) log-probs of the micro-batch's mismatched sequences."""
    from services.trainer.logprobs import sequence_logps

    micro = method.collate(rows, pad_id)
    labels, count = micro.extras["logp_labels"], len(rows)
    with torch.no_grad():
        inputs = micro.model_inputs()
        policy, _ = sequence_logps(method.forward(**inputs).logits, labels, micro.sample_ids, micro.num_samples)
        reference, _ = sequence_logps(method.reference.forward(**inputs).logits, labels, micro.sample_ids,
                                      micro.num_samples)
    return policy[count:], reference[count:]


if __name__ == "__main__":
    run_rank(pathlib.Path(sys.argv[1]), sys.argv[2])
