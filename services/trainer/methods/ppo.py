"""PPO (--rlhf_type ppo) on the online seam, as TRL 0.x's PPOTrainer that ms-swift runs: the policy
generates one completion per prompt; a reward model (a checkpoint of `--rlhf_type rm`) scores it;
per-token rewards are the KL penalty to a frozen reference plus the score on the last token; a
value model, initialised from the reward model, gives GAE's baseline; the rollout then feeds
num_ppo_epochs x num_mini_batches optimizer steps of the clipped policy and value losses
(services.trainer.losses.ppo).

The value model trains beside the policy with its own AdamW (the engine's optimizer holds the
policy's parameters only): each micro-batch's value loss is back-propagated here and the value
model steps after the last micro-batch of each optimizer step. Its weights and optimizer state
go into every checkpoint (`value_model/`), published beside the policy, and a resume reads them
back (`checkpoint_files`, `resume`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import ClassVar

import numpy as np
import torch

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data, devices, distributed, methods, modeling
from services.trainer.config import METHOD_KINDS
from services.trainer.logprobs import token_logps
from services.trainer.methods.grpo import generation_seed, stop_tokens
from services.trainer.losses import ppo as ppo_losses
from services.trainer.rollout.base import Completion, Sampling

VALUE_MODEL = "value_model"  # the value model's directory in a checkpoint
VALUE_OPTIMIZER = "optimizer.pt"


def order_seed(seed: int, step: int) -> int:
    """The seed of a rollout's mini-batch orders: the run's seed and the step the rollout starts at
    (a stream of its own beside the generation seeds), so a resume repeats them."""
    return int(np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(1)[0])


def sequences(prompts: list[list[int]], completions: list[tuple[int, ...]], pad_id: int) -> data.MicroBatch:
    """A micro-batch of prompt + completion rows, right-padded, the completion tokens labelled."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        row = list(prompt) + list(completion)
        input_ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prompt):len(row)] = torch.tensor(completion, dtype=torch.long)
        attention[i, :len(row)] = 1
    return data.MicroBatch(input_ids=input_ids, labels=labels, attention_mask=attention,
                           tokens=int(attention.sum()), sample_ids=torch.where(
                               attention.bool(), torch.arange(len(prompts)).unsqueeze(1), -1),
                           num_samples=len(prompts))


def to_completion_layout(values: torch.Tensor, prompt_lens: list[int], lengths: list[int]) -> torch.Tensor:
    """[rows, seq - 1] (the causal shift's layout: position t scores token t + 1) -> [rows, longest
    completion], each row's completion tokens from column 0, 0 after them."""
    out = values.new_zeros((values.size(0), max(lengths)))
    for i, (p, n) in enumerate(zip(prompt_lens, lengths)):
        out[i, :n] = values[i, p - 1:p - 1 + n]
    return out


def to_shifted_layout(values: torch.Tensor, prompt_lens: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """The inverse of to_completion_layout for a micro-batch of sequences `width` long."""
    out = values.new_zeros((values.size(0), width - 1))
    for i, (p, n) in enumerate(zip(prompt_lens, lengths)):
        out[i, p - 1:p - 1 + n] = values[i, :n]
    return out


def value_model_from(scorer, config) -> torch.nn.Module:
    """The value model: a float32 copy of the loaded reward model (services.trainer.rewards.
    RewardModel; an adapter merged into its base) under the policy's tuner, as ms-swift prepares
    it: fresh LoRA adapters of the job's lora_rank/lora_alpha/target_modules with the score head
    trained whole (lora, qlora), or every weight (full)."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(scorer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float()
    if not config.is_adapter:
        return model.requires_grad_(True).train()
    model.requires_grad_(False)
    targets = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, modules_to_save=list(config.modules_to_save) or None,
                      task_type="SEQ_CLS")
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = str(scorer.path)  # its base is the reward model
    return model.train()


def token_scores(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] float32: the model's one-output head at every position (TRL's get_reward: the
    backbone's last hidden states through the head)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: its layers adapted
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


class Ppo:
    name: ClassVar[str] = "ppo"
    kinds, needs = METHOD_KINDS["ppo"]
    online: ClassVar[bool] = True
    # per step (TRL 0.x's PPOTrainer names)
    metrics: ClassVar[tuple[str, ...]] = ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg",
                                          "val/clipfrac_avg", "policy/approxkl_avg")
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        from libs.default_model.resolve import resolve_model
        from services.trainer.reference import Reference
        from services.trainer.rewards.model import RewardModel

        world = distributed.world_from_env()
        if world.distributed:  # the value model's optimizer is this process's own
            raise InvalidArgument("rlhf_type ppo trains on one process", field="nproc_per_node")
        self.config, self.args = config, config.ppo
        self.forward, self.policy, self.tokenizer = forward, model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.model_dir = resolve_model(config.model).resolve()
        self.reference = Reference(config, forward, model, self.model_dir)
        self.scorer = RewardModel(self.args.reward_model[0], self.device, devices.compute_dtype(config),
                                  batch_size=config.per_device_train_batch_size)
        # the value model trains in float32: loaded as such when the scorer computes in torch_dtype
        same = devices.compute_dtype(config) == torch.float32
        source = self.scorer if same else RewardModel(self.args.reward_model[0], self.device)
        self.value_model = value_model_from(source, config)
        self.value_optimizer = torch.optim.AdamW([p for p in self.value_model.parameters() if p.requires_grad],
                                                 lr=config.learning_rate, weight_decay=config.weight_decay)
        self.temperature = self.args.temperature
        self.sampling = Sampling(n=1, max_tokens=self.args.max_completion_length, temperature=self.temperature,
                                 stop_token_ids=stop_tokens(tokenizer, model))
        self.generator = None

    # --- the online seam
    def prompts_per_rollout(self) -> int:
        return (self.config.per_device_train_batch_size * self.config.gradient_accumulation_steps
                * self.args.num_mini_batches)

    def updates_per_rollout(self) -> int:
        return self.args.num_ppo_epochs * self.args.num_mini_batches

    def _generate(self, prompts: list[data.PromptRow], step: int) -> tuple[list[Completion], float]:
        from services.trainer import rollout

        if self.generator is None:
            self.generator = rollout.build(self.config, self.model_dir, self.tokenizer,
                                           distributed.world_from_env(), self.policy)
        started = time.perf_counter()
        self.generator.sync(self.policy, step)
        synced = time.perf_counter() - started
        seeds = [generation_seed(self.config.seed, step, row.key if row.key is not None else i)
                 for i, row in enumerate(prompts)]
        out = self.generator.generate([row.input_ids.astype(np.int64).tolist() for row in prompts], seeds,
                                      self.sampling)
        return [completions[0] for completions in out], synced

    def rollout(self, prompts: list[data.PromptRow], step: int) -> methods.Rollout:
        seconds: dict[str, float] = {}
        started = time.perf_counter()
        completions, synced = self._generate(prompts, step)
        seconds["generation"] = time.perf_counter() - started - synced
        if self.generator.name != "transformers":  # generating with the policy itself: nothing to sync
            seconds["sync"] = synced
        prompt_ids = [row.input_ids.astype(np.int64).tolist() for row in prompts]
        prompt_lens = [len(p) for p in prompt_ids]
        lengths = [len(c.token_ids) for c in completions]
        batch_size = self.config.per_device_train_batch_size
        chunks = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
        micro = [sequences([prompt_ids[i] for i in chunk], [completions[i].token_ids for i in chunk], self.pad_id)
                 for chunk in chunks]

        def per_completion(fn) -> torch.Tensor:  # [completions, longest completion]
            width = max(lengths)
            parts = []
            for chunk, mb in zip(chunks, micro):
                values = to_completion_layout(fn(mb.to(self.device)), [prompt_lens[i] for i in chunk],
                                              [lengths[i] for i in chunk])
                parts.append(torch.nn.functional.pad(values, (0, width - values.size(1))))
            return torch.cat(parts).double()

        with torch.no_grad():
            started = time.perf_counter()
            old_logps = per_completion(lambda mb: self._logps(self.forward, mb))
            seconds["old_logps"] = time.perf_counter() - started
            started = time.perf_counter()
            ref_logps = per_completion(lambda mb: self._logps(self.reference.forward, mb))
            seconds["reference"] = time.perf_counter() - started
            started = time.perf_counter()
            scores = self.scorer.score(prompt_ids, [c.token_ids for c in completions]).to(self.device).double()
            with devices.autocast(self.config, self.device):  # as in the loss
                old_values = per_completion(lambda mb: token_scores(self.value_model, mb.input_ids,
                                                                    mb.attention_mask)[:, :-1])
            seconds["reward"] = time.perf_counter() - started
        finished = torch.tensor([c.finished for c in completions], device=scores.device)
        scores = ppo_losses.penalise_missing_eos(scores, finished, self.args.missing_eos_penalty)
        mask = (torch.arange(max(lengths), device=scores.device).unsqueeze(0)
                < torch.tensor(lengths, device=scores.device).unsqueeze(1)).double()
        rewards, kl = ppo_losses.kl_penalised_rewards(scores, old_logps, ref_logps, mask, self.args.kl_coef)
        if self.args.whiten_rewards:
            rewards = ppo_losses.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_losses.gae(rewards, old_values, mask, self.args.gamma, self.args.lam)
        advantages = ppo_losses.masked_whiten(advantages, mask)
        non_score = (-self.args.kl_coef * kl).sum(1)
        logged = {"objective/scores": float(scores.mean()), "objective/kl": float(kl.sum(1).mean()),
                  "objective/non_score_reward": float(non_score.mean()),
                  "objective/rlhf_reward": float((scores + non_score).mean()),
                  "completions/mean_length": float(np.mean(lengths)),
                  "completions/clipped_ratio": float((~finished).double().mean())}
        per_token = {"old_logps": old_logps, "advantages": advantages, "returns": returns, "old_values": old_values}
        return methods.Rollout(self._updates(step, prompt_ids, completions, per_token), seconds, logged)

    def _updates(self, step: int, prompt_ids, completions, per_token) -> list[list[data.MicroBatch]]:
        """num_ppo_epochs passes over the rollout, each in a new order (seeded by the run's seed
        and the step: a resume repeats it), cut into num_mini_batches optimizer steps of
        gradient_accumulation_steps micro-batches."""
        count, per_device = len(prompt_ids), self.config.per_device_train_batch_size
        per_update = count // self.args.num_mini_batches
        generator = torch.Generator().manual_seed(order_seed(self.config.seed, step))
        updates = []
        for _epoch in range(self.args.num_ppo_epochs):
            order = torch.randperm(count, generator=generator).tolist()
            for m in range(self.args.num_mini_batches):
                picked = order[m * per_update:(m + 1) * per_update]
                group = []
                for start in range(0, len(picked), per_device):
                    rows = picked[start:start + per_device]
                    group.append(self._micro(rows, prompt_ids, completions, per_token,
                                             last=start + per_device >= len(picked)))
                updates.append(group)
        return updates

    def _micro(self, rows, prompt_ids, completions, per_token, last: bool) -> data.MicroBatch:
        prompts = [prompt_ids[i] for i in rows]
        micro = sequences(prompts, [completions[i].token_ids for i in rows], self.pad_id)
        lens, lengths = [len(p) for p in prompts], [len(completions[i].token_ids) for i in rows]
        width = micro.input_ids.size(1)
        extras = {name: to_shifted_layout(values[rows].float(), lens, lengths, width)
                  for name, values in per_token.items()}
        extras["last_of_step"] = torch.tensor(1 if last else 0)
        return dataclasses.replace(micro, extras=extras)

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()
            self.generator = None

    # --- forwards
    def _logps(self, forward, micro: data.MicroBatch) -> torch.Tensor:
        """[batch, seq - 1]: the labelled tokens' log-probs at the sampling temperature (TRL 0.x
        divides the logits by it, at rollout and in the loss alike)."""
        logits = forward(**micro.model_inputs(self.dtype)).logits
        return token_logps(logits.float() / (self.temperature + 1e-7), micro.labels)[0]

    # --- the loss
    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        raise FailedPrecondition("rlhf_type ppo batches its own rollouts", field="rlhf_type")

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"completion_tokens": int((micro.labels[:, 1:] != IGNORE_INDEX).sum())}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = max(step["completion_tokens"], 1)
        extras = micro.extras
        logps, mask = token_logps(
            self.forward(**micro.model_inputs(self.dtype)).logits.float() / (self.temperature + 1e-7),
            micro.labels)
        mask = mask.float()
        pg, pg_clipped = ppo_losses.policy_loss(logps, extras["old_logps"], extras["advantages"],
                                                self.args.cliprange)
        with devices.autocast(self.config, self.device):
            values = token_scores(self.value_model, micro.input_ids, micro.attention_mask)[:, :-1]
        vf, vf_clipped = ppo_losses.value_loss(values, extras["old_values"], extras["returns"],
                                               self.args.cliprange_value)
        policy_loss = (pg * mask).sum() / total
        value_loss = (vf * mask).sum() / total
        (self.args.vf_coef * value_loss * (0.0 if micro.filler else 1.0)).backward()
        if int(extras["last_of_step"]) and not micro.filler:
            self._step_value_model()
        metrics = {"loss/policy_avg": policy_loss.detach(), "loss/value_avg": value_loss.detach(),
                   "policy/clipfrac_avg": (pg_clipped * mask).sum() / total,
                   "val/clipfrac_avg": (vf_clipped * mask).sum() / total,
                   "policy/approxkl_avg": (0.5 * (logps - extras["old_logps"]) ** 2 * mask).sum().detach() / total}
        # the value loss is added as a number: its gradient went to the value model above
        return policy_loss + self.args.vf_coef * value_loss.detach(), metrics

    def _step_value_model(self) -> None:
        parameters = [p for p in self.value_model.parameters() if p.grad is not None]
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.value_optimizer.step()
        self.value_optimizer.zero_grad(set_to_none=True)

    # --- checkpoints
    def checkpoint_files(self, directory: pathlib.Path) -> None:
        """Writes the value model and its optimizer state into `value_model/` of the checkpoint
        being built: a PEFT adapter (SEQ_CLS, the score head whole) on the reward model, whose
        directory its adapter_config.json names, or (full) a whole sequence-classification model."""
        target = directory / VALUE_MODEL
        self.value_model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        with open(target / VALUE_OPTIMIZER, "wb") as f:
            torch.save(self.value_optimizer.state_dict(), f)

    def resume(self, checkpoint_dir: pathlib.Path, optimizer: bool = True) -> None:
        """The value model (and its optimizer state) of a checkpoint this method wrote."""
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification

        source = pathlib.Path(checkpoint_dir) / VALUE_MODEL
        adapter = hasattr(self.value_model, "get_base_model")
        if not (source / ("adapter_config.json" if adapter else "config.json")).is_file():
            raise InvalidArgument(f"{checkpoint_dir} has no {VALUE_MODEL}/ of this train type: not a checkpoint of "
                                  f"rlhf_type ppo with train_type {self.config.train_type}",
                                  field="resume_from_checkpoint")
        if adapter:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.value_model, load_file(source / "adapter_model.safetensors"))
        else:
            loaded = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
            self.value_model.load_state_dict(loaded.state_dict())
        if optimizer:
            self.value_optimizer.load_state_dict(torch.load(source / VALUE_OPTIMIZER, map_location=self.device,
                                                            weights_only=True))


METHOD = Ppo
