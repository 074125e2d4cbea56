"""Group relative policy optimisation (--rlhf_type grpo), an online method: each rollout
generates --num_generations completions of each of this rank's prompt rows (seeded per prompt
from --seed, the step and the row's key), scores them with the reward functions and reward
models, turns the rewards into group-relative advantages and trains --num_iterations optimizer
steps on them with the clipped GRPO loss and the KL to the reference
(services.trainer.losses.grpo). A group never spans ranks: only --scale_rewards batch and the
logged metrics pool over ranks."""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import time
from typing import Any, ClassVar

import numpy as np
import torch

from libs.dataset.schema import IGNORE_INDEX
from services.trainer import batching, data, distributed, modeling, packing, rewards, rollout
from services.trainer.config import METHOD_KINDS
from services.trainer.logprobs import token_logps
from services.trainer.losses import grpo as losses
from services.trainer.methods import Rollout
from services.trainer.reference import Reference
from services.trainer.rollout.base import Completion, Sampling

COMPLETIONS_FILE = "completions.jsonl"


def generation_seed(seed: int, step: int, key: int, attempt: int = 0) -> int:
    """The seed of one prompt's completions: a stable hash of the run's seed, the step its rollout
    starts at, the row's key (its id in the dataset) and, for --dynamic_sample, the attempt, so
    the same prompt at the same step draws the same completions whichever rank or run (a resume)
    generates it."""
    return int(np.random.SeedSequence([seed, step, key, attempt]).generate_state(1)[0])


class Grpo:
    name: ClassVar[str] = "grpo"
    online: ClassVar[bool] = True
    kinds, needs = METHOD_KINDS["grpo"]
    metrics: ClassVar[tuple[str, ...]] = losses.METRICS
    build_model = staticmethod(modeling.build_model)

    def __init__(self, config, forward, model, tokenizer):
        from libs.default_model.resolve import resolve_model

        self.config, self.args = config, config.grpo
        self.forward, self.model, self.tokenizer = forward, model, tokenizer
        self.dtype, self.attention = model.dtype, packing.attention_path(model)
        self.world = distributed.world_from_env()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.params = losses.Params(self.args.loss_type, self.args.epsilon, self.args.epsilon_high, self.args.beta,
                                    self.args.max_completion_length)
        model_dir = resolve_model(config.model).resolve()
        # beta 0: no KL term, no reference loaded (ms-swift)
        self.reference = Reference(config, forward, model, model_dir) if self.args.beta > 0 else None
        self.keep_logits = modeling.takes_logits_to_keep(model) and (
            self.reference is None or self.reference.model is None or modeling.takes_logits_to_keep(self.reference.model))
        self.device = next(model.parameters()).device
        self.funcs = rewards.resolve(self.args.reward_funcs, self.args.external_plugins, self.args.reward_params())
        if self.args.reward_model:
            from services.trainer.rewards.model import RewardModel

            for i, path in enumerate(self.args.reward_model):
                name = "reward_model" if len(self.args.reward_model) == 1 else f"reward_model_{i}"
                self.funcs.append(RewardModel(path, self.device).reward_func(name))
        self.sampling = Sampling(n=self.args.num_generations, max_tokens=self.args.max_completion_length,
                                 temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k,
                                 stop_token_ids=stop_tokens(tokenizer, model))
        self.generator = rollout.build(config, model_dir, tokenizer, self.world, model)
        self.completions_file = (pathlib.Path(config.output_dir) / COMPLETIONS_FILE
                                 if self.args.log_completions and self.world.is_main else None)
        self.completions_checked = False
        self.synced: int | None = None  # the step the generator last got the policy of
        self.ahead = Ahead(self.generator) if self.args.async_generate else None

    # --- the online seam

    def prompts_per_rollout(self) -> int:
        completions = self.config.per_device_train_batch_size * self.config.gradient_accumulation_steps
        return completions // self.args.num_generations

    def updates_per_rollout(self) -> int:
        return self.args.num_iterations

    def rollout(self, prompts: list[data.PromptRow], step: int,
                following: tuple[list[data.PromptRow], int] | None = None) -> Rollout:
        """`following` (--async_generate only): the next rollout's prompts and step, generated in
        the background from the policy as it is now while this rollout trains."""
        seconds: dict[str, float] = {}
        prompt_ids = [row.input_ids.astype(np.int64).tolist() for row in prompts]
        keys = [row.key if row.key is not None else i for i, row in enumerate(prompts)]
        groups = self.ahead.take(step, prompt_ids, seconds) if self.ahead is not None else None
        if groups is None:  # not generated ahead: the first rollout (or one after a resume without it) is on-policy
            self._sync(step, seconds)
            started = time.perf_counter()
            groups = self.generator.generate(prompt_ids, [generation_seed(self.config.seed, step, k) for k in keys],
                                             self.sampling)
            seconds["generation"] = time.perf_counter() - started
        if following is not None:  # the policy that generates it: this rollout's, before its updates
            self._sync(step, seconds)
            rows, at = following
            following_ids = [row.input_ids.astype(np.int64).tolist() for row in rows]
            seeds = [generation_seed(self.config.seed, at, row.key if row.key is not None else i)
                     for i, row in enumerate(rows)]
            self.ahead.start(at, following_ids, seeds, self.sampling)

        started = time.perf_counter()
        scored = self._score(prompts, prompt_ids, groups)
        seconds["reward"] = time.perf_counter() - started
        if self.args.dynamic_sample:
            groups, scored = self._resample(prompts, prompt_ids, keys, step, groups, scored, seconds)
        total, per_func = scored

        advantages, logged = self._advantages(total, per_func, groups)
        micro_batches = self._micro_batches(prompt_ids, groups, advantages)
        if self.reference is not None:
            started = time.perf_counter()
            for micro in micro_batches:
                micro.extras["ref_logps"] = self._token_logps(micro, self.reference.forward)
            seconds["reference"] = time.perf_counter() - started
        if self.args.num_iterations > 1:  # the later iterations' ratio is to the rollout's policy
            started = time.perf_counter()
            for micro in micro_batches:
                micro.extras["old_logps"] = self._token_logps(micro, self.forward)
            seconds["old_logps"] = time.perf_counter() - started
        if self.args.log_completions:
            self._log_completions(step, prompt_ids, groups, total, per_func, advantages)
        return Rollout([micro_batches] * self.args.num_iterations, seconds, logged)

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        self.generator.close()

    def _sync(self, step: int, seconds: dict[str, float]) -> None:
        """Pushes the policy to the generator, once per rollout boundary (--async_generate syncs
        before generating the next rollout, which the boundary's own rollout may already have)."""
        if self.synced == step:
            return
        started = time.perf_counter()
        self.generator.sync(self.model, step)
        self.synced = step
        if self.generator.name != "transformers":  # generating with the policy itself: nothing to sync
            seconds["sync"] = seconds.get("sync", 0.0) + time.perf_counter() - started

    # --- --async_generate: the rollout generated ahead is part of a checkpoint

    def checkpoint_files(self, directory: pathlib.Path) -> None:
        if self.ahead is not None:
            self.ahead.save(directory)

    def resume(self, checkpoint_dir: pathlib.Path, optimizer: bool = True) -> None:
        if self.ahead is not None:
            self.ahead.load(checkpoint_dir)

    # --- the offline seam: a rollout's micro-batches

    def collate(self, rows: list, pad_id: int) -> data.MicroBatch:
        return data.collate(rows, pad_id)

    def counts(self, micro: data.MicroBatch) -> dict[str, int]:
        return losses.counts(micro.labels[..., 1:] != IGNORE_INDEX)

    def loss(self, micro: data.MicroBatch, step: dict[str, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, labels = self._inputs(micro)
        logits = self.forward(**inputs).logits  # [b, s, vocab]
        # the log-probs of the distribution sampled from (TRL and ms-swift divide by the temperature)
        logps, mask = token_logps(logits / self.args.temperature, labels)
        extras = micro.extras
        return losses.grpo_loss(logps, extras["advantages"], mask, step, self.params,
                                old_logps=extras.get("old_logps"), ref_logps=extras.get("ref_logps"))

    # --- the parts of a rollout

    def _score(self, prompts: list[data.PromptRow], prompt_ids: list[list[int]],
               groups: list[list[Completion]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total [N], {name: [N]}) of the N = prompts x num_generations completions, prompt-major."""
        n = self.args.num_generations
        repeat = lambda values: [value for value in values for _ in range(n)]  # noqa: E731 (one per completion)
        completion_ids = [list(c.token_ids) for group in groups for c in group]
        names = list(prompts[0].columns) if prompts else []
        columns = {name: repeat([row.columns.get(name) for row in prompts]) for name in names}
        sources = repeat([f"{row.key} of {self.config.dataset}" for row in prompts])  # "row K of DATASET"
        return rewards.score(self.funcs, self.args.reward_weights,
                             repeat([self.tokenizer.decode(ids) for ids in prompt_ids]),
                             self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                             completion_ids, columns, sources, prompt_ids=repeat(prompt_ids))

    def _resample(self, prompts, prompt_ids, keys, step, groups, scored, seconds):
        """--dynamic_sample: a group whose rewards are all equal teaches nothing (advantages 0);
        its prompt is generated again with the next attempt's seed, up to max_resample_times,
        and the first group with unequal rewards replaces it (ms-swift draws new prompts
        instead: here the rollout keeps its rows, so the data cursor stays exact)."""
        n = self.args.num_generations
        total, per_func = scored
        for attempt in range(1, self.args.max_resample_times + 1):
            flat = total.view(-1, n)
            equal = [i for i in range(len(prompts)) if bool((flat[i] == flat[i, 0]).all())]
            if not equal:
                break
            started = time.perf_counter()
            again = self.generator.generate([prompt_ids[i] for i in equal],
                                            [generation_seed(self.config.seed, step, keys[i], attempt) for i in equal],
                                            self.sampling)
            seconds["generation"] += time.perf_counter() - started
            started = time.perf_counter()
            new_total, new_per_func = self._score([prompts[i] for i in equal], [prompt_ids[i] for i in equal], again)
            seconds["reward"] += time.perf_counter() - started
            for j, i in enumerate(equal):
                if bool((new_total[j * n:(j + 1) * n] != new_total[j * n]).any()):
                    groups[i] = again[j]
                    total[i * n:(i + 1) * n] = new_total[j * n:(j + 1) * n]
                    for name in per_func:
                        per_func[name][i * n:(i + 1) * n] = new_per_func[name][j * n:(j + 1) * n]
        return groups, (total, per_func)

    def _advantages(self, total: torch.Tensor, per_func: dict[str, torch.Tensor],
                    groups: list[list[Completion]]) -> tuple[torch.Tensor, dict[str, float]]:
        """The completions' advantages and the rollout's logged metrics over every rank (TRL's
        names). A completion no reward function scored (NaN) gets advantage 0 and stands at its
        group's mean in the group's statistics."""
        n = self.args.num_generations
        scored = ~torch.isnan(total)
        grouped = total.view(-1, n)
        means = torch.nanmean(grouped, dim=1, keepdim=True).nan_to_num(0.0)
        filled = torch.where(torch.isnan(grouped), means, grouped).reshape(-1)
        batch_sums = None
        if self.args.scale_rewards == "batch":
            batch_sums = distributed.all_sum(losses.reward_sums(filled), self.world)
        advantages = losses.advantages(filled, n, self.args.scale_rewards, batch_sums) * scored
        std = losses.reward_std(filled, n, self.args.scale_rewards, batch_sums)

        lengths = [len(c.token_ids) for group in groups for c in group]
        unfinished = sum(not c.finished for group in groups for c in group)
        zero_std = int((grouped.std(dim=1).nan_to_num(0.0) == 0).sum()) if grouped.numel() else 0
        names = sorted(per_func)
        # float32 values summed in float64 are exact sums: the same whichever ranks hold them
        local = [float(filled.double().sum()), float(filled.numel()), float(std.double().sum()), float(zero_std),
                 float(grouped.size(0)), float(sum(lengths)), float(unfinished)]
        for name in names:
            values = per_func[name].double()
            local += [float(torch.nansum(values)), float((~torch.isnan(values)).sum())]
        summed = distributed.all_sum(local, self.world)
        reward, count, std_sum, zero, group_count, length, clipped = summed[:7]
        logged = {"reward": reward / count, "reward_std": std_sum / count, "frac_reward_zero_std": zero / group_count,
                  "completions/mean_length": length / count, "completions/clipped_ratio": clipped / count}
        for i, name in enumerate(names):
            value_sum, value_count = summed[7 + 2 * i], summed[8 + 2 * i]
            logged[f"rewards/{name}/mean"] = value_sum / value_count if value_count else math.nan
        return advantages, logged

    def _micro_batches(self, prompt_ids: list[list[int]], groups: list[list[Completion]],
                       advantages: torch.Tensor) -> list[data.MicroBatch]:
        """The completions (prompt + completion, only the completion's tokens labelled) of one
        optimizer step in micro-batches of at most per_device_train_batch_size rows, grouped by
        length (services.trainer.batching: less padding, the same update); every rank makes as
        many as the rank wanting the most, so the reference's forwards pair up under FSDP2 and
        ZeRO-3. bnpo, whose loss is a mean over each micro-batch, keeps the rollout's order in
        micro-batches of per_device_train_batch_size (TRL's)."""
        rows = []
        for prompt, group in zip(prompt_ids, groups):
            for completion in group:
                ids = np.array(prompt + list(completion.token_ids), dtype=np.int32)
                labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
                labels[len(prompt):] = ids[len(prompt):]
                rows.append(data.Row(ids, labels))
        size = self.config.per_device_train_batch_size
        if self.args.loss_type == "bnpo":
            layout = [list(range(start, min(start + size, len(rows)))) for start in range(0, len(rows), size)]
        else:
            lengths = [len(row.input_ids) for row in rows]
            layout = batching.length_groups(lengths, size)
            if self.world.distributed:
                layout = batching.length_groups(lengths, size, distributed.all_max(len(layout), self.world))
        out = []
        for picked in layout:
            micro = data.collate([rows[i] for i in picked], self.pad_id)
            micro.extras["advantages"] = advantages[picked].clone()
            out.append(micro)
        return out

    def _inputs(self, micro: data.MicroBatch) -> tuple[dict, torch.Tensor]:
        """The forward's inputs of a micro-batch and the labels its logits line up with: logits
        only from the position before the micro-batch's first completion token (the prompt
        positions before it score nothing; TRL's logits_to_keep), where the models take it."""
        inputs = micro.model_inputs(self.dtype, self.attention)
        labels = micro.labels
        if not self.keep_logits:
            return inputs, labels
        length = labels.size(1)
        labelled = labels != IGNORE_INDEX
        firsts = torch.where(labelled.any(dim=1), labelled.int().argmax(dim=1), length - 1)
        first = min(max(int(firsts.min()), 1), length - 1)
        inputs["logits_to_keep"] = length - first + 1
        return inputs, labels[:, first - 1:]

    def _token_logps(self, micro: data.MicroBatch, forward) -> torch.Tensor:
        """[b, positions] the completion tokens' log-probs under `forward` (the reference, or the
        policy before this rollout's updates), on the host like the rest of the micro-batch."""
        with torch.no_grad():
            inputs, labels = self._inputs(micro.to(self.device))
            logits = forward(**inputs).logits
            return token_logps(logits / self.args.temperature, labels)[0].cpu()

    def _log_completions(self, step, prompt_ids, groups, total, per_func, advantages) -> None:
        """--log_completions: every rank's completions of this rollout, rank 0 appending them to
        completions.jsonl (a resumed run first drops the lines past its checkpoint)."""
        n = self.args.num_generations
        mine = []
        for i, (prompt, group) in enumerate(zip(prompt_ids, groups)):
            for j, completion in enumerate(group):
                k = i * n + j
                mine.append({"step": step + 1, "prompt": self.tokenizer.decode(prompt),
                             "completion": self.tokenizer.decode(list(completion.token_ids), skip_special_tokens=True),
                             "reward": _number(total[k]),
                             **{name: _number(values[k]) for name, values in per_func.items()},
                             "advantage": _number(advantages[k])})
        everyone = distributed.gather(mine, self.world)
        if self.completions_file is None:
            return
        if not self.completions_checked:
            self.completions_checked = True
            if self.completions_file.exists():
                kept = [line for line in self.completions_file.read_text().splitlines()
                        if line and json.loads(line)["step"] <= step]
                self.completions_file.write_text("".join(line + "\n" for line in kept))
        with self.completions_file.open("a") as f:
            for rank_rows in everyone:
                for entry in rank_rows:
                    f.write(json.dumps(entry) + "\n")


class Ahead:
    """--async_generate: the next rollout's generation, running on a background thread while
    the current rollout trains (ms-swift's async_generate: generated by the policy one rollout
    behind the one it trains). The serving service generates in its own process; a colocated
    engine on this thread, its torch kernels releasing the GIL (its scheduler's Python does
    not: measured, the overlap is real but the two share the cores). A checkpoint keeps the completions generated ahead (waiting for them first), so a resumed
    run trains on what the uninterrupted run would have."""

    FILE = "async_rollout.json"

    def __init__(self, generator):
        self.generator = generator
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-generate")
        self.pending: tuple[int, list[list[int]], concurrent.futures.Future] | None = None

    def start(self, step: int, prompt_ids: list[list[int]], seeds: list[int], sampling: Sampling) -> None:
        def generate():
            started = time.perf_counter()
            groups = self.generator.generate(prompt_ids, seeds, sampling)
            return groups, time.perf_counter() - started

        self.pending = (step, prompt_ids, self.executor.submit(generate))

    def take(self, step: int, prompt_ids: list[list[int]], seconds: dict[str, float]) -> list[list[Completion]] | None:
        """The completions generated ahead for the rollout of `step` (None: none were);
        `seconds` gets their generation time and the time this thread waited for them."""
        if self.pending is None:
            return None
        at, ids, future = self.pending
        self.pending = None
        started = time.perf_counter()
        groups, generated = future.result()  # a generation's error is raised here, in the training thread
        if at != step or ids != prompt_ids:
            return None  # read for another rollout (a resume with other data): generate this one anew
        seconds["generation"] = generated
        seconds["generation_wait"] = time.perf_counter() - started
        return groups

    def save(self, directory: pathlib.Path) -> None:
        if self.pending is None:
            return
        at, ids, future = self.pending
        groups, generated = future.result()
        self.pending = (at, ids, _done((groups, generated)))
        (directory / self.FILE).write_text(json.dumps({
            "step": at, "prompt_ids": ids,
            "completions": [[[list(c.token_ids), c.finished] for c in group] for group in groups]}))

    def load(self, directory: pathlib.Path) -> None:
        path = directory / self.FILE
        if not path.is_file():  # saved without --async_generate, or at the run's end: the next rollout is on-policy
            return
        saved = json.loads(path.read_text())
        groups = [[Completion(tuple(ids), bool(finished)) for ids, finished in group] for group in saved["completions"]]
        self.pending = (int(saved["step"]), saved["prompt_ids"], _done((groups, 0.0)))

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)  # a generation in flight ends before its engine
        self.pending = None


def _done(value) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


def stop_tokens(tokenizer, model) -> tuple[int, ...]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation EOS (a chat
    template's end-of-turn)."""
    found = []
    config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and token not in found:
                found.append(int(token))
    return tuple(found)


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


METHOD = Grpo
