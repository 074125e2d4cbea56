"""The SFT recipe (LoRA or full), top to bottom: setup (base model, adapter, optimizer, scheduler,
data), the training loop, save. It reports what happens through `report(event, **fields)`
and stops at the next step boundary, publishing a checkpoint, once `stop` is set. With
`resume_from_checkpoint` it continues exactly where that checkpoint stood: weights,
optimizer, scheduler, RNG, step and data cursor (only the weights with resume_only_model)."""

from __future__ import annotations

import math
import pathlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from libs.common.errors import InvalidArgument
from services.trainer import checkpointing, data
from services.trainer.config import SftConfig, as_dict
from services.trainer.loss import sft_loss


class Reporter(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


@dataclass
class LogWindow:
    """What happened since the last logged step (HF semantics: the loss is the mean over
    the window's steps; tokens and waits are sums; rates are over the window's wall time)."""

    started: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    trained_tokens: int = 0
    data_wait_seconds: float = 0.0

    def add(self, loss: float, tokens: int, trained: int, data_wait: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.trained_tokens += trained
        self.data_wait_seconds += data_wait

    def entry(self, step: int, total: int, learning_rate: float, grad_norm: float, eta: float) -> dict[str, Any]:
        seconds = time.perf_counter() - self.started
        return {
            "step": step, "total_steps": total,
            "loss": sum(self.losses) / len(self.losses),
            "learning_rate": learning_rate, "grad_norm": grad_norm,
            "tokens": self.tokens, "trained_tokens": self.trained_tokens,
            "tokens_per_second": self.tokens / seconds if seconds > 0 else 0.0,
            "data_wait_seconds": self.data_wait_seconds,
            "step_seconds": seconds / len(self.losses),
            "eta_seconds": eta,
        }


def build_model(config: SftConfig, model_dir):
    """The base model (on CPU, in `torch_dtype`): every weight trainable for `full`, else
    frozen with fresh LoRA adapters on `target_modules`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config.torch_dtype))
    if config.train_type == "full":
        base.requires_grad_(True)
        return base
    targets = "all-linear" if config.target_modules == ["all-linear"] else list(config.target_modules)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:  # peft's message for target modules the base does not have
        raise InvalidArgument(str(exc), field="target_modules") from exc


def load_adapter_weights(model, checkpoint_dir: pathlib.Path) -> None:
    """Puts a published adapter's weights into a freshly built PEFT model of the same shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(checkpoint_dir / "adapter_model.safetensors"))
    if loaded.unexpected_keys:
        raise InvalidArgument(f"{checkpoint_dir} does not match this adapter configuration (lora_rank, "
                              f"target_modules): unexpected {', '.join(loaded.unexpected_keys[:3])}",
                              field="resume_from_checkpoint")


def rng_state() -> dict[str, Any]:
    """Every random stream the recipe draws from (dropout uses torch's CPU generator)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def build_optimizer(model, config: SftConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D ones (biases, norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def train_step(model, batch: data.StepBatch, trainable: list[torch.nn.Parameter], optimizer, scheduler,
               max_grad_norm: float) -> tuple[float, float, float]:
    """One optimizer step over the batch's micro-batches; returns (loss, grad norm before
    clipping, learning rate used). Each micro-batch's loss is divided by the trained tokens
    of the whole step, so how rows are split into micro-batches does not change the update."""
    trained = batch.trained_tokens
    loss_value = 0.0
    for micro in batch.micro_batches:
        logits = model(input_ids=micro.input_ids, attention_mask=micro.attention_mask).logits  # [b, s, vocab]
        loss = sft_loss(logits, micro.labels, trained)
        loss.backward()
        loss_value += loss.item()
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
    learning_rate = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm, learning_rate


def train(config: SftConfig, report: Reporter, stop: threading.Event | None = None) -> int:
    """Runs one job; returns the last step trained."""
    from transformers import AutoTokenizer, get_scheduler

    from libs.default_model.resolve import resolve_model

    stop = stop or threading.Event()

    # --- setup
    model_dir = resolve_model(config.model).resolve()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = config.train_type == "full"
    resume_dir = pathlib.Path(config.resume_from_checkpoint).resolve() if config.resume_from_checkpoint else None
    # A full checkpoint is a whole model: it is the model to build; an adapter goes on the base.
    model = build_model(config, resume_dir if resume_dir and full else model_dir)
    if resume_dir and not full:
        load_adapter_weights(model, resume_dir)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)

    rows = data.DataprepRows(config.dataprep_address, config.dataset)
    num_rows = rows.count_rows() if config.max_steps <= 0 else None
    total = data.total_steps(config.max_steps, config.num_train_epochs, num_rows or 0,
                             config.per_device_train_batch_size, config.gradient_accumulation_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(config.warmup_ratio * total), num_training_steps=total)
    step, cursor, logged = 0, data.DataCursor(), []
    if resume_dir and not config.resume_only_model:
        state, training = checkpointing.read_state(resume_dir)
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        # last: building the model and optimizer above consumed random numbers
        set_rng_state(training["rng"])
        step, cursor = int(state["step"]), data.DataCursor.from_dict(state["data_cursor"])
        logged = [entry for entry in checkpointing.read_logged(resume_dir) if entry["step"] <= step]
    batches = data.step_batches(rows, config.per_device_train_batch_size, config.gradient_accumulation_steps, pad_id,
                                start=cursor)

    args = {**as_dict(config), "model": str(model_dir), "output_dir": str(pathlib.Path(config.output_dir).resolve()),
            "adapter_name": config.resolved_adapter_name(),
            "resume_from_checkpoint": str(resume_dir) if resume_dir else None}
    run = checkpointing.RunDir(config.output_dir, args, logged=logged)
    report("started", total_steps=total, rows=num_rows, arguments=run.args, resumed_step=step,
           trainable_parameters=sum(p.numel() for p in trainable))

    last_saved = step
    step_seconds: list[float] = []
    window = LogWindow()

    def save(final: bool) -> None:
        nonlocal last_saved
        state = {"step": step, "total_steps": total, "data_cursor": cursor.to_dict()}
        training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        path, seconds = run.publish(step, model, state, tokenizer=tokenizer if full else None, training_state=training)
        last_saved = step
        # A full checkpoint is a whole model, not an adapter: no adapter name, so serving
        # (which hot-loads adapters) leaves it alone.
        report("checkpoint", step=step, path=str(path), final=final, base_model=str(model_dir),
               adapter_name="" if full else config.resolved_adapter_name(), publish_seconds=seconds)

    def log(learning_rate: float, grad_norm: float) -> None:
        nonlocal window
        eta = (total - step) * sum(step_seconds) / len(step_seconds)
        entry = window.entry(step, total, learning_rate, grad_norm, eta)
        run.log(entry)
        report("step", **entry)
        window = LogWindow()

    # --- loop
    learning_rate = grad_norm = 0.0
    while step < total and not stop.is_set():
        started = time.perf_counter()
        batch = next(batches)
        trained = batch.trained_tokens
        loss_value, grad_norm, learning_rate = train_step(model, batch, trainable, optimizer, scheduler,
                                                          config.max_grad_norm)
        step, cursor = step + 1, batch.cursor
        seconds = time.perf_counter() - started
        step_seconds.append(seconds)
        window.add(loss_value, batch.tokens, trained, batch.data_wait_seconds)
        report("progress", step=step, seconds=seconds, tokens=batch.tokens, trained_tokens=trained,
               data_wait_seconds=batch.data_wait_seconds)
        if step % config.logging_steps == 0 or step == total:
            log(learning_rate, grad_norm)
        if step % config.save_steps == 0 and step < total and not stop.is_set():
            save(final=False)

    # --- save (a cancelled run keeps what it trained; nothing trained, nothing to save)
    if window.losses:
        log(learning_rate, grad_norm)
    if step > 0 and step != last_saved:
        save(final=True)
    report("done", step=step, total_steps=total, cancelled=step < total)
    return step
