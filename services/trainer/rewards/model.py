"""A reward model trained by `tuneforge rlhf --rlhf_type rm` as a reward (`--reward_model`):
its checkpoint found (a LoRA adapter of task SEQ_CLS with its `score` head trained whole, a
full sequence-classification model directory, `tuneforge export`'s merge of the former, or a
run directory: its newest checkpoint), loaded for inference, and one score per
prompt_ids + completion_ids sequence, batched, without gradients. A sequence's score is the
head's output at its last token that is not the pad id, as the rm method trained it and as
transformers pools."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

from libs.common import adapter_dir, checkpoint
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound

FIELD = "reward_model"


def checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """The reward model's directory: `path` itself when it holds an adapter or a model,
    else the newest checkpoint of the run directory `path`."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise NotFound(f"{path} does not exist", field=FIELD)
    for candidate in (path, *checkpoint.checkpoints(path)[-1:]):
        if (candidate / adapter_dir.ADAPTER_CONFIG).is_file() or (candidate / "config.json").is_file():
            return candidate.resolve()
    raise NotFound(f"{path} holds no reward model (no adapter_config.json or config.json, nor a checkpoint-N "
                   "with one): give a checkpoint of `tuneforge rlhf --rlhf_type rm`", field=FIELD)


def _json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{path} is not readable JSON: {exc}", field=FIELD) from exc
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{path} must hold a JSON object", field=FIELD)
    return data


def describe(path: str | pathlib.Path) -> tuple[pathlib.Path, bool]:
    """(the checkpoint directory, whether it is an adapter), refusing one that is not a
    reward model: an adapter of another task, or a model without a one-output
    sequence-classification head."""
    found = checkpoint_dir(path)
    if (found / adapter_dir.ADAPTER_CONFIG).is_file():
        task = _json(found / adapter_dir.ADAPTER_CONFIG).get("task_type")
        if task != "SEQ_CLS":
            raise InvalidArgument(f"{found} is a LoRA adapter of task {task}, not a reward model (SEQ_CLS, from "
                                  "`tuneforge rlhf --rlhf_type rm`)", field=FIELD)
        return found, True
    config = _json(found / "config.json")
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise InvalidArgument(f"{found} is a {', '.join(map(str, architectures)) or 'model'}, not a reward model "
                              "(a sequence-classification model from `tuneforge rlhf --rlhf_type rm`)", field=FIELD)
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 1)
    if labels != 1:
        raise InvalidArgument(f"{found} scores with {labels} outputs; a reward model has one", field=FIELD)
    return found, False


def problems(paths: Sequence[str]) -> list[str]:
    """Submission-time problems of --reward_model paths (without loading a weight)."""
    found = []
    for path in paths:
        try:
            describe(path)
        except (NotFound, InvalidArgument, FailedPrecondition) as exc:
            found.append(str(exc))
    return found


class RewardModel:
    """`RewardModel(path, device).score(prompt_ids, completion_ids)` -> [N] float32 on CPU."""

    def __init__(self, path: str | pathlib.Path, device: Any = "cpu", dtype: Any = None, batch_size: int = 8):
        import torch

        self.path, is_adapter = describe(path)
        if (self.path / checkpoint.MANIFEST).is_file():
            checkpoint.verify(self.path)
        self.device, self.batch_size = torch.device(device), batch_size
        dtype = dtype or torch.float32
        self.model = (self._adapted(dtype) if is_adapter else self._full(dtype)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id
        if self.pad_id is None:
            raise FailedPrecondition(f"{self.path}: the model's config has no pad_token_id, which it pools by",
                                     field=FIELD)

    def _full(self, dtype):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(self.path, dtype=dtype)

    def _adapted(self, dtype):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from libs.default_model.resolve import resolve_model

        info = adapter_dir.inspect(self.path, field=FIELD)
        if info.base_model is None:
            raise FailedPrecondition(f"{self.path} records no base model (args.json `model`, adapter_config.json "
                                     "base_model_name_or_path)", field=FIELD)
        base_dir = resolve_model(str(adapter_dir.normalize(info.base_model)))
        # as the rm method built it (build_reward_model): the base tokenizer's pad id, else its eos
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, dtype=dtype, num_labels=1,
                                                                  pad_token_id=pad_id)
        try:
            return PeftModel.from_pretrained(base, self.path)
        except (ValueError, RuntimeError) as exc:  # a head or LoRA shapes that do not fit the base
            raise InvalidArgument(f"{self.path} does not fit its base model {base_dir}: "
                                  f"{str(exc).strip().splitlines()[0]}", field=FIELD) from exc

    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]):
        """[N] float32 (CPU): the score of each prompt + completion. Sequences are batched
        by length (right-padded with the pad id, masked), so padding never changes a score."""
        import torch

        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        scores = torch.empty(len(sequences), dtype=torch.float32)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                width = max(len(sequences[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                    mask[row, :len(sequences[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                scores[batch] = logits[:, 0].float().cpu()
        return scores

    def reward_func(self, name: str = "reward_model"):
        """This model as a reward function for `scoring.score` (which must get `prompt_ids`)."""
        from services.trainer.rewards.scoring import RewardFunc

        def reward_model(completions, prompt_ids=None, completion_ids=None, **kwargs) -> list[float]:
            if prompt_ids is None:
                raise ValueError("a reward model scores token ids: score() needs prompt_ids")
            return self.score(prompt_ids, completion_ids).tolist()

        return RewardFunc(name, reward_model, str(self.path))
