"""The training recipe (full, LoRA or QLoRA; any method of services.trainer.methods), top to
bottom: setup (model, adapter, optimizer, scheduler, data, method), the training loop, save.
It reports what happens through `report(event, **fields)` and stops at the next step boundary
(an online method's: the next rollout boundary), publishing a checkpoint, once `stop` is set.
With `resume_from_checkpoint` it continues exactly where that checkpoint stood: weights,
optimizer, scheduler, RNG, step and data cursor (only the weights with resume_only_model).
What differs between methods (the batch, the forward, the loss and its metrics) is the
method's; everything else is here, once. An online method (grpo, ...) feeds the same loop:
each rollout it makes of its prompt rows is the micro-batches of one or more optimizer steps
(`online_steps`)."""

from __future__ import annotations

import math
import pathlib
import random
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.dataset import client as dataset_client
from services.trainer import checkpointing, data, dataset_check, devices, distributed, evaluation, memory, methods, vocabulary
from services.trainer.config import TrainConfig, as_dict


class Reporter(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


@dataclass
class LogWindow:
    """What happened since the last logged step (HF semantics: the loss is the mean over
    the window's steps; tokens and waits are sums; rates are over the window's wall time)."""

    started: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)
    metrics: list[dict[str, float]] = field(default_factory=list)  # the method's, per step
    tokens: int = 0
    trained_tokens: int = 0
    data_wait_seconds: float = 0.0
    # an online method's time split (generation, reward, reference, old_logps, sync, train), summed
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, metrics: dict[str, float], tokens: int, trained: int, data_wait: float,
            phases: dict[str, float] | None = None) -> None:
        self.losses.append(loss)
        self.metrics.append(metrics)
        self.tokens += tokens
        self.trained_tokens += trained
        self.data_wait_seconds += data_wait
        for phase, seconds in (phases or {}).items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def mean_metrics(self) -> dict[str, float]:
        """Each metric's mean over the window's steps (as the loss)."""
        names = self.metrics[0] if self.metrics else {}
        return {name: sum(m[name] for m in self.metrics) / len(self.metrics) for name in names}

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
            **{f"{phase}_seconds": value for phase, value in self.phase_seconds.items()},
        }


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
    """Every random stream the recipe may draw from: torch's CPU generator (dropout on the
    CPU), the current CUDA device's (dropout on a GPU), Python's and numpy's. Tensors and plain
    values only (training_state.pt is read back with weights_only)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Puts back what rng_state saved (a checkpoint from before numpy's or CUDA's state was
    kept leaves those streams as seeded)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                             saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def build_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D ones (biases, norms)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    """The learning-rate schedule: linear warmup over ceil(warmup_ratio x steps), then cosine
    to 0, linear to 0, or constant (Hugging Face's schedules, as ms-swift)."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                         num_training_steps=total_steps)


@dataclass
class StepResult:
    loss: float  # this rank's share of the step's loss (the ranks' shares sum to it)
    metrics: dict[str, float]  # the method's, likewise shares
    grad_norm: float  # before clipping
    learning_rate: float  # the one the step used


def step_counts(method: methods.Method, batch: data.StepBatch,
                world: distributed.World) -> tuple[dict[str, int], int]:
    """The method's normalisers summed over the step's micro-batches and every rank, and the
    most micro-batches any rank has in this step (one collective for both)."""
    totals: dict[str, int] = {}
    for micro in batch.micro_batches:
        for name, value in method.counts(micro).items():
            totals[name] = totals.get(name, 0) + value
    most = len(batch.micro_batches)
    if world.distributed:
        names = sorted(totals)
        mine = [0.0] * world.world_size  # each rank's count in its own slot: the sum holds them all
        mine[world.rank] = float(most)
        summed = distributed.all_sum([totals[name] for name in names] + mine, world)
        totals = dict(zip(names, map(int, summed[:len(names)])))
        most = int(max(summed[len(names):]))
    return totals, most


def train_step(method: methods.Method, batch: data.StepBatch, trainable: list[torch.nn.Parameter],
               engine: distributed.Engine, scheduler, max_grad_norm: float) -> StepResult:
    """One optimizer step over the batch's micro-batches. Each micro-batch's loss is divided
    by the method's totals over the whole step (every rank's), so how rows are split into
    micro-batches or ranks does not change the update. `engine` runs backward and the
    optimizer step for the back end (the method's forward runs through it too).

    Every rank runs as many micro-batches as the rank with the most (at an epoch's end a
    rank may hold a row fewer): under FSDP2 and ZeRO every forward and backward is a
    collective. A rank's extra micro-batches repeat its first through the method's whole
    loss (policy and reference forwards alike, so the collectives pair up) with weight zero."""
    step, most = step_counts(method, batch, engine.world)
    loss_value, metrics = 0.0, dict.fromkeys(method.metrics, 0.0)  # every rank sums the same names
    own = len(batch.micro_batches)
    for i in range(most):
        micro = batch.micro_batches[i] if i < own else replace(batch.micro_batches[0], filler=True)
        if engine.device is not None:  # counted above on the host; computed on the rank's device
            micro = micro.to(engine.device)
        loss, logged = method.loss(micro, step)
        if i >= own:  # weight zero: adds nothing to the gradients, the loss or the metrics
            engine.backward(loss * 0.0, last=i == most - 1)
            continue
        engine.backward(loss, last=i == most - 1)
        loss_value += loss.item()
        for name, value in logged.items():
            metrics[name] += float(value)
    learning_rate = scheduler.get_last_lr()[0]
    grad_norm = engine.step(trainable, max_grad_norm)  # clips, steps, clears the gradients
    scheduler.step()
    return StepResult(loss_value, metrics, grad_norm, learning_rate)


@dataclass
class Step:
    """One optimizer step's batch, and where it stands in its rollout (offline methods: every
    step is a rollout of its own)."""

    batch: data.StepBatch
    last: bool = True  # the rollout's last step: a checkpoint or a stop may follow it
    seconds: dict[str, float] = field(default_factory=dict)  # the rollout's time split (on its first step)
    logged: dict[str, float] = field(default_factory=dict)  # the rollout's metrics (every rank's, on every step)


def offline_steps(batches: Iterator[data.StepBatch]) -> Iterator[Step]:
    for batch in batches:
        yield Step(batch)


def online_total(max_steps: int, num_train_epochs: float, per_epoch: int, updates: int) -> int:
    """max_steps when positive, else epochs x whole rollouts per epoch (rounded up) x the
    optimizer steps each rollout feeds."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(num_train_epochs * per_epoch)) * updates


def online_steps(method, prompts: Iterator[data.PromptBatch], step: int, total: int | None = None) -> Iterator[Step]:
    """The optimizer steps of an online method's rollouts, rollout after rollout, from `step`
    (a rollout boundary): each rollout's prompts are read, then generated, scored and batched
    by the method (its time split goes with its first step). A method that generates ahead
    (grpo --async_generate) also gets the next rollout's prompts and step, up to `total`."""
    ahead = getattr(getattr(method, "args", None), "async_generate", False)
    prompts = iter(prompts)
    batch = next(prompts, None)
    while batch is not None:
        after = step + method.updates_per_rollout()
        following = next(prompts, None) if ahead and after < (total or 0) else None
        if following is not None:
            rollout = method.rollout(batch.rows, step, following=(following.rows, after))
        else:
            rollout = method.rollout(batch.rows, step)
        for i, micro_batches in enumerate(rollout.updates):
            last = i == len(rollout.updates) - 1
            yield Step(data.StepBatch(micro_batches, batch.cursor, batch.data_wait_seconds if i == 0 else 0.0),
                       last=last, seconds=rollout.seconds if i == 0 else {}, logged=rollout.logged)
            step += 1
        batch = following if following is not None else next(prompts, None)


def train(config: TrainConfig, report: Reporter, stop: threading.Event | None = None) -> int:
    """Runs one job; returns the last step trained."""
    from transformers import AutoTokenizer

    from libs.default_model.resolve import resolve_model

    stop = stop or threading.Event()
    dataset_check.check(config)  # the service checked at submission; a worker run directly is checked here
    world = distributed.init(config)  # torchrun's ranks join the process group; one process: nothing
    device = devices.resolve(config, world.local_rank)  # cuda:LOCAL_RANK, the CPU, or --device
    # Shuffled reads and row counts (from the manifest) need the whole dataset: one the service is
    # still preparing is waited for. File order for max_steps reads shards as they are written.
    described = None
    method_class = methods.get(config.rlhf_type)
    online = methods.is_online(method_class)  # its rollouts per epoch come from the manifest's row count
    if config.dataset_shuffle or config.max_steps <= 0 or online:
        described = dataset_client.wait_complete(config.dataprep_address, config.dataset, stop)
        if described is None:  # cancelled while waiting: nothing trained, nothing to save
            report("done", step=0, total_steps=0, cancelled=True)
            distributed.close()
            return 0

    # --- setup
    model_dir = resolve_model(config.model).resolve()
    torch.manual_seed(config.seed)
    tokenizer = vocabulary.load(config.tokenizer, model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    full = not config.is_adapter
    resume_dir = pathlib.Path(config.resume_from_checkpoint).resolve() if config.resume_from_checkpoint else None
    # A full checkpoint is a whole model: it is the model to build; an adapter goes on the base.
    model = method_class.build_model(config, resume_dir if resume_dir and full else model_dir)
    if resume_dir and not full:
        load_adapter_weights(model, resume_dir)
    model = devices.place(model, device)
    if devices.mixed(config):
        devices.master_weights(model)  # the optimizer steps float32 numbers; autocast computes in torch_dtype
    model.train()
    model = distributed.shard(model, config, world)  # FSDP2 replaces the parameters: before collecting them
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, config)
    engine = distributed.wrap(model, optimizer, config, world, device)
    method = method_class(config, engine.forward, model, tokenizer)
    if resume_dir and hasattr(method, "resume"):  # what a method trains beside the policy (ppo's value model)
        method.resume(resume_dir, optimizer=not config.resume_only_model)

    # each rank reads its own share: row j of an epoch's order (held-out rows left out) goes to
    # rank j % world_size, so every rank's count follows from the manifest's
    rows, eval_rows = evaluation.sources(config, world.rank, world.world_size)
    num_rows = rows.rows(described.rows) if described else None
    most_rows = rows.rows(described.rows, rank=0) if described else 0  # the largest share, by one row at most
    if hasattr(method, "prepare"):  # a method's own pass over the data first (dpo: --precompute_ref_log_probs)
        rows, eval_rows = method.prepare(rows, eval_rows, world, pad_id)
    # every rank computes the same total (rank 0's): no rank stops while another still steps
    if online:  # every rank the same rollouts an epoch: as many as the smallest share holds
        per_epoch = data.rollouts_per_epoch(rows.rows(described.rows, rank=world.world_size - 1),
                                            method.prompts_per_rollout())
        if per_epoch < 1:  # before the resume arithmetic below divides by it
            raise FailedPrecondition(f"the dataset has fewer prompt rows for this reader than one rollout takes "
                                     f"({method.prompts_per_rollout()}: per_device_train_batch_size x "
                                     "gradient_accumulation_steps / num_generations)", field="dataset")
        total = online_total(config.max_steps, config.num_train_epochs, per_epoch, method.updates_per_rollout())
    else:
        total = data.total_steps(config.max_steps, config.num_train_epochs, most_rows,
                                 config.per_device_train_batch_size, config.gradient_accumulation_steps)
    scheduler = build_scheduler(optimizer, config, total)
    step, cursor, logged = 0, data.DataCursor(), []
    if resume_dir and not config.resume_only_model:
        state, training = checkpointing.read_state(resume_dir)
        data.check_order(state.get("data_order"), config.dataset_shuffle, config.seed, resume_dir)
        # every rank's data cursor (and optimizer shard) is a slice of that many processes' work
        rng, cursors = training["rng"], state.get("data_cursors", [state["data_cursor"]])
        if len(cursors) != world.world_size:
            raise InvalidArgument(f"{resume_dir} was trained by {len(cursors)} processes; resume it with as many "
                                  f"(this run has {world.world_size})", field="resume_from_checkpoint")
        if engine.sharded:  # ZeRO, FSDP2: each rank reads its own shards
            engine.load_shards(resume_dir)
        else:
            engine.load_optimizer_state(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        if engine.scaler is not None and "grad_scaler" in training:  # float16: the loss scale it had reached
            engine.scaler.load_state_dict(training["grad_scaler"])
        # last: building the model and optimizer above consumed random numbers
        set_rng_state(rng[world.rank] if isinstance(rng, list) else rng)
        step, cursor = int(state["step"]), data.DataCursor.from_dict(cursors[world.rank])
        logged = [entry for entry in checkpointing.read_logged(resume_dir) if entry["step"] <= step]
    if online:  # resumed at a rollout boundary: step // updates rollouts done, per_epoch in each epoch
        prompts = data.prompt_batches(rows, method.prompts_per_rollout(), per_epoch, start=cursor,
                                      done=(step // method.updates_per_rollout()) % per_epoch)
        steps = online_steps(method, prompts, step, total)
    else:
        steps = offline_steps(data.step_batches(rows, config.per_device_train_batch_size,
                                                config.gradient_accumulation_steps,
                                                lambda group: method.collate(group, pad_id), start=cursor))

    args = {**as_dict(config), "model": str(model_dir), "output_dir": str(pathlib.Path(config.output_dir).resolve()),
            "adapter_name": config.resolved_adapter_name(),
            "resume_from_checkpoint": str(resume_dir) if resume_dir else None}
    run = checkpointing.RunDir(config.output_dir, args, logged=logged) if world.is_main else None  # rank 0 writes
    report("started", total_steps=total, rows=num_rows, arguments=run.args if run else args, resumed_step=step,
           trainable_parameters=sum(p.numel() for p in trainable), device=str(device),
           backend=engine.name)

    last_saved = step
    step_seconds: list[float] = []
    window = LogWindow()

    def save(final: bool) -> None:
        nonlocal last_saved
        train_peak = memory.peak_rss_bytes()  # over the steps since the loop began or the last save
        memory.reset_peak()
        save_start = memory.peak_rss_bytes()  # the RSS the save starts from
        state = {"step": step, "total_steps": total, "data_cursor": cursor.to_dict(),
                 "data_order": data.order(config.dataset_shuffle, config.seed)}
        training = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
        publishable, staged, staging_seconds = model, None, 0.0
        if not engine.sharded:
            training["optimizer"] = engine.optimizer_state()
        if engine.scaler is not None:  # the same on every rank (gradients are reduced before it looks)
            training["grad_scaler"] = engine.scaler.state_dict()
        if world.distributed:  # collectives: every rank takes part, rank 0 publishes
            state["data_cursors"] = distributed.gather(cursor.to_dict(), world)
            training["rng"] = distributed.gather(rng_state(), world)
            publishable = engine.publishable()
            if engine.sharded:  # each rank's own shards, the model files gathered one parameter at a time
                started = time.perf_counter()
                staged, publishable = checkpointing.stage_shards(run, step, engine, world), None
                staging_seconds = time.perf_counter() - started
        last_saved = step
        if world.is_main:
            try:
                path, seconds = run.publish(step, publishable, state, tokenizer=tokenizer if full or config.tokenizer else None,
                                            files=getattr(method, "checkpoint_files", None),
                                            training_state=training, staged=staged)
                published_at = time.time()  # serving measures the event's delivery from here
            except Exception:  # counted by the service (an alert), then the job fails as it would
                report("checkpoint_failed", step=step)
                raise
        # every rank's peak RSS while training and while saving (rank 0's includes the publication)
        peaks = distributed.gather([train_peak, save_start, memory.peak_rss_bytes()], world)
        memory.reset_peak()
        if not world.is_main:
            return
        # Serving hot-loads a checkpoint with an adapter name into its LLM engine. A full
        # checkpoint is a whole model, not an adapter, and a reward model's adapter carries a
        # scoring head, not a generator: no name, so serving leaves them alone.
        served = not full and config.rlhf_type != "rm"
        report("checkpoint", step=step, path=str(path), final=final, base_model=str(model_dir),
               adapter_name=config.resolved_adapter_name() if served else "", publish_seconds=staging_seconds + seconds,
               published_at=published_at,
               rss_bytes=dict(zip(("train_peak", "save_start", "save_peak"), map(list, zip(*peaks)))))

    def log(learning_rate: float, grad_norm: float) -> None:
        nonlocal window
        eta = (total - step) * sum(step_seconds) / len(step_seconds)
        entry, logged = window.entry(step, total, learning_rate, grad_norm, eta), window.mean_metrics()
        if run is not None:
            run.log({**entry, **logged})  # TRL's names beside the loss (rewards/chosen, ...)
        report("step", **entry, method=method.name, metrics=logged)
        window = LogWindow()

    def run_eval() -> None:
        with evaluation.eval_mode(model):
            result = evaluation.evaluate(method, eval_rows, config.per_device_train_batch_size, pad_id, world,
                                         device=engine.device)
            if config.predict_with_generate:  # every rank generates its own eval rows
                generated, scored = evaluation.generate_nlg(model, eval_rows, tokenizer, config, world, engine.device)
        entry = {"step": step, "eval_loss": result.loss, "eval_trained_tokens": result.trained_tokens,
                 "eval_rows": result.rows}
        logged = {f"eval_{name}": value for name, value in result.metrics.items()}
        if config.predict_with_generate:
            logged.update(generated, eval_nlg_rows=scored)
        if run is not None:
            run.log({**entry, **logged})
        report("eval", **entry, method=method.name, metrics=logged)

    # --- loop
    learning_rate = grad_norm = 0.0
    agreed_stop = False  # distributed: ranks stop at the same step, when any was asked to

    def stopping() -> bool:
        return agreed_stop if world.distributed else stop.is_set()

    memory.reset_peak()  # the training peak leaves setup out (ZeRO-3 builds the whole model on every rank first)
    boundary, rollout_start = True, step  # online: a stop or a checkpoint waits for the rollout's end
    while step < total and not (boundary and stopping()):
        started = time.perf_counter()
        item = next(steps)
        batch = item.batch
        trained, tokens = batch.trained_tokens, batch.tokens
        trained_at = time.perf_counter()
        result = train_step(method, batch, trainable, engine, scheduler, config.max_grad_norm)
        phases = {**item.seconds, "train": time.perf_counter() - trained_at} if online else None
        loss_value, logged = result.loss, result.metrics
        grad_norm, learning_rate = result.grad_norm, result.learning_rate
        if world.distributed:  # the step's loss, metrics and tokens over all ranks, and whether any must stop
            names = sorted(logged)
            summed = distributed.all_sum([loss_value, *(logged[n] for n in names), tokens, trained,
                                          float(stop.is_set())], world)
            loss_value, logged = summed[0], dict(zip(names, summed[1:1 + len(names)]))
            tokens, trained, agreed_stop = int(summed[-3]), int(summed[-2]), summed[-1] > 0
        logged = {**logged, **item.logged}  # the rollout's metrics are every rank's already
        step = step + 1
        if item.last:
            cursor = batch.cursor
        seconds = time.perf_counter() - started
        step_seconds.append(seconds)
        window.add(loss_value, logged, tokens, trained, batch.data_wait_seconds, phases)
        report("progress", step=step, seconds=seconds, tokens=tokens, trained_tokens=trained,
               data_wait_seconds=batch.data_wait_seconds, **({"phase_seconds": phases} if phases else {}))
        if step % config.logging_steps == 0 or step == total:
            log(learning_rate, grad_norm)
        if eval_rows is not None and (step % config.resolved_eval_steps() == 0 or step == total):
            run_eval()  # before the save: save_total_limit keeps the best checkpoint by this loss
        # a save_steps multiple passed during this rollout (offline: this step is one)
        due = item.last and step // config.save_steps > rollout_start // config.save_steps
        if due and step < total and not stopping():
            save(final=False)
        boundary = item.last
        if boundary:
            rollout_start = step

    # --- save (a cancelled run keeps what it trained; nothing trained, nothing to save)
    if window.losses:
        log(learning_rate, grad_norm)
    if step > 0 and step != last_saved:
        save(final=True)
    if online:
        method.close()
    if run is not None:
        run.close()  # final loss curves, TensorBoard events flushed
    report("done", step=step, total_steps=total, cancelled=step < total)
    distributed.close()
    return step
