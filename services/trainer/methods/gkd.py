"""GKD (--rlhf_type gkd) on the online seam, as ms-swift's GKDTrainer (TRL's with its fixes): each
rollout is one optimizer step, trained on the student's own generations with probability lmbda
(drawn from the run's seed and the step, as ms-swift), else on the teacher's generations
(--seq_kd) or the dataset's answers. The loss is the generalized JSD between the student's and the
frozen teacher's next-token distributions over the answer tokens (services.trainer.losses.gkd),
summed and divided by the step's answer tokens, plus sft_alpha x the answers' NLL on steps the
student did not generate.

Data: conversations with answers (task sft: the prompt is a row's tokens before its first trained
token) or prompts alone (task prompt: only with --lmbda 1 or --seq_kd, which never read an answer).
"""

from __future__ import annotations

import random
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from libs.common.errors import FailedPrecondition
from libs.dataset.schema import IGNORE_INDEX
from services.trainer import data, devices, distributed, methods, modeling, reference
from services.trainer.config import METHOD_KINDS
from services.trainer.losses.gkd import generalized_jsd
from services.trainer.methods.grpo import generation_seed, stop_tokens
from services.trainer.methods.ppo import sequences
from services.trainer.rollout.base import Sampling

STUDENT, TEACHER, DATASET = 0, 1, 2  # where a step's answers come from


def split(row) -> tuple[list[int], list[int] | None]:
    """(prompt ids, answer ids or None): a sft row's tokens before its first trained token and
    the rest; a prompt row's tokens and no answer."""
    ids = row.input_ids.tolist()
    if isinstance(row, data.PromptRow):
        return ids, None
    trained = (row.labels != IGNORE_INDEX).nonzero()[0]
    if len(trained) == 0:
        return ids, []
    first = int(trained[0])
    return ids[:first], ids[first:]


class Gkd:
    name: ClassVar[str] = "gkd"
    kinds, needs = METHOD_KINDS["gkd"]
    online: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ("jsd", "nll_loss", "on_policy")
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        from libs.default_model.resolve import resolve_model

        self.config, self.args = config, config.gkd
        self.forward, self.policy, self.tokenizer = forward, model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.dtype = model.dtype
        self.model_dir = resolve_model(config.model).resolve()
        teacher = reference.load(config, self.args.teacher_model, self.args.teacher_adapters).to(self.device)
        self.teacher = distributed.frozen(teacher, config, distributed.world_from_env())
        self._teacher_module = teacher  # unwrapped, for generate (--seq_kd)
        self.sampling = Sampling(n=1, max_tokens=self.args.max_completion_length, temperature=self.args.temperature,
                                 stop_token_ids=stop_tokens(tokenizer, model))
        self.generator = None
        self.teacher_generator = None

    # --- the online seam
    def prompts_per_rollout(self) -> int:
        return self.config.per_device_train_batch_size * self.config.gradient_accumulation_steps

    def updates_per_rollout(self) -> int:
        return 1

    def source(self, step: int) -> int:
        """Where step `step`'s answers come from: the student with probability lmbda (ms-swift draws
        random.Random(seed + step).random() <= lmbda: every rank the same), else the teacher with
        --seq_kd, else the dataset."""
        if random.Random(self.config.seed + step).random() <= self.args.lmbda:
            return STUDENT
        return TEACHER if self.args.seq_kd else DATASET

    def rollout(self, prompts: list, step: int) -> methods.Rollout:
        from services.trainer import rollout
        from services.trainer.rollout.transformers import TransformersGenerator

        source, seconds = self.source(step), {}
        split_rows = [split(row) for row in prompts]
        prompt_ids = [p for p, _ in split_rows]
        if source == DATASET:
            answers = [a for _, a in split_rows]
            if any(a is None for a in answers):  # refused at submission (dataset_check): said again here
                raise FailedPrecondition("a step on the dataset's answers, but its rows are prompts without "
                                         "answers: gkd trains on task prompt data only with --lmbda 1 or --seq_kd",
                                         field="dataset")
        else:
            if source == STUDENT:
                if self.generator is None:
                    self.generator = rollout.build(self.config, self.model_dir, self.tokenizer,
                                                   distributed.world_from_env(), self.policy)
                generator = self.generator
                started = time.perf_counter()
                generator.sync(self.policy, step)
                if generator.name != "transformers":  # generating with the policy itself: nothing to sync
                    seconds["sync"] = time.perf_counter() - started
            else:
                if self.teacher_generator is None:
                    self.teacher_generator = TransformersGenerator(self._teacher_module, self.pad_id, self.config)
                generator = self.teacher_generator
            started = time.perf_counter()
            seeds = [generation_seed(self.config.seed, step, row.key if row.key is not None else i)
                     for i, row in enumerate(prompts)]
            out = generator.generate(prompt_ids, seeds, self.sampling)
            answers = [list(completions[0].token_ids) for completions in out]
            seconds["generation"] = time.perf_counter() - started
        per_device = self.config.per_device_train_batch_size
        micro_batches = []
        for start in range(0, len(prompt_ids), per_device):
            rows = slice(start, start + per_device)
            micro = sequences(prompt_ids[rows], [tuple(a) for a in answers[rows]], self.pad_id)
            micro.extras["source"] = torch.tensor(source)
            micro_batches.append(micro)
        logged = {"completions/mean_length": sum(map(len, answers)) / max(len(answers), 1)}
        return methods.Rollout([micro_batches], seconds, logged)

    def close(self) -> None:
        for generator in (self.generator, self.teacher_generator):
            if generator is not None:
                generator.close()
        self.generator = self.teacher_generator = None

    # --- the loss
    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        raise FailedPrecondition("rlhf_type gkd batches its own rollouts", field="rlhf_type")

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return {"answer_tokens": micro.trained_tokens}

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total = max(step["answer_tokens"], 1)
        inputs = micro.model_inputs(self.dtype)
        student = self.forward(**inputs).logits[:, :-1].float()
        with torch.no_grad(), devices.autocast(self.config, self.device):
            teacher = self.teacher(**inputs).logits[:, :-1].float()
        vocab = min(student.size(-1), teacher.size(-1))  # the same tokenizer; a padded head's extra rows unused
        mask = micro.labels[:, 1:] != IGNORE_INDEX
        jsd = (generalized_jsd(student[..., :vocab], teacher[..., :vocab], self.args.beta) * mask).sum() / total
        loss = jsd
        on_policy = int(micro.extras["source"]) == STUDENT
        nll = student.new_zeros(())
        if self.args.sft_alpha > 0 and not on_policy:
            nll = F.cross_entropy(student.reshape(-1, student.size(-1)), micro.labels[:, 1:].reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum") / total
            loss = loss + self.args.sft_alpha * nll
        share = mask.sum() / total  # the step's on_policy metric sums to 1 or 0
        return loss, {"jsd": jsd.detach(), "nll_loss": nll.detach(),
                      "on_policy": share.float() if on_policy else share.new_zeros((), dtype=torch.float32)}


METHOD = Gkd
