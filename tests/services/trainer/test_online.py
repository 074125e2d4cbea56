"""The online path's parts, fast: prompt rows read over gRPC from a real dataprep server with
their extra columns and keys, grouped into rollouts (whole rollouts only, the same count on
every rank, resumed exactly from a rollout boundary); transformers generation seeded per prompt
(a prompt's completions do not depend on its neighbours, the training's RNG is left alone);
GRPO's --dynamic_sample; a reward model beside a reward function, weighted; the step count; the
time split's Prometheus metrics."""

import itertools
import json

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import data, metrics, modeling, training
from services.trainer.config import GrpoConfig, TrainConfig
from services.trainer.data import DataCursor
from services.trainer.methods import grpo
from services.trainer.rollout.base import Completion, Sampling
from services.trainer.rollout.transformers import TransformersGenerator

QUESTIONS = ["who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "Tell me a story.",
             "What can you do?", "Say hi."]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prompt_dataset(dataprep_address, default_model, tmp_path_factory) -> str:
    """7 prompt rows, row i with solution str(i) and a level i % 3."""
    root = tmp_path_factory.mktemp("prompts")
    raw = root / "prompts.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "solution": str(i),
                                       "level": i % 3}) + "\n" for i, q in enumerate(QUESTIONS)))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / "prepared"), task="prompt"))
    assert manifest["rows_out"] == len(QUESTIONS)
    return str(root / "prepared")


def solutions(batch: data.PromptBatch) -> list[str]:
    return [row.columns["solution"] for row in batch.rows]


def test_prompt_rows_carry_their_extra_columns_and_keys(dataprep_address, prompt_dataset, default_model):
    from transformers import AutoTokenizer

    rows = data.DataprepRows(dataprep_address, prompt_dataset)
    read = [row for row, _cursor in rows.epoch_rows(DataCursor())]
    assert all(isinstance(row, data.PromptRow) for row in read)
    assert [row.columns for row in read] == [{"solution": str(i), "level": i % 3} for i in range(7)]
    assert [row.key for row in read] == list(range(7))
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    assert tokenizer.decode(read[0].input_ids.tolist()).endswith(
        "user\nwho are you?<|im_end|>\n<|im_start|>assistant\n")


def test_rollouts_are_whole_the_same_count_on_every_rank_and_resume_exactly(dataprep_address, prompt_dataset):
    # 2 ranks: rank 0 reads rows 0, 2, 4, 6 and rank 1 rows 1, 3, 5 of each epoch; rollouts of 2 prompts: one an
    # epoch on both ranks (rank 1 has 3 rows), rank 0's rows 4 and 6 are not read (TRL's RepeatSampler drops them)
    sources = [data.DataprepRows(dataprep_address, prompt_dataset, rank=r, world_size=2) for r in (0, 1)]
    per_epoch = data.rollouts_per_epoch(sources[1].rows(7), 2)
    assert per_epoch == 1 and data.rollouts_per_epoch(sources[0].rows(7), 2) == 2
    plans = []
    for source in sources:
        batches = data.prompt_batches(source, 2, per_epoch)
        plans.append([(solutions(b), b.cursor.epoch) for b in (next(batches), next(batches))])
    assert plans == [[(["0", "2"], 1), (["0", "2"], 2)], [(["1", "3"], 1), (["1", "3"], 2)]]

    # one rank, 3 rollouts of 2 an epoch (row 6 left out); resumed from each rollout boundary
    whole = data.DataprepRows(dataprep_address, prompt_dataset, shuffle=True, seed=3)
    batches = data.prompt_batches(whole, 2, 3)
    reference = [next(batches) for _ in range(7)]
    assert [b.cursor.epoch for b in reference] == [0, 0, 1, 1, 1, 2, 2]
    # shuffled: the row left out of epoch 0 is not always the last one
    assert sorted(sum((solutions(b) for b in reference[:3]), [])) != sorted(map(str, range(6)))
    assert len({s for b in reference[:3] for s in solutions(b)}) == 6
    for done in range(1, 6):
        resumed = data.prompt_batches(whole, 2, 3, start=reference[done - 1].cursor, done=done % 3)
        assert [solutions(next(resumed)) for _ in range(7 - done)] == [solutions(b) for b in reference[done:]]


def test_a_dataset_smaller_than_a_rollout_is_refused_with_the_flags(dataprep_address, prompt_dataset):
    from libs.common.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="fewer prompt rows for this reader than one rollout takes \\(8: "
                                                 "per_device_train_batch_size x gradient_accumulation_steps"):
        next(data.prompt_batches(data.DataprepRows(dataprep_address, prompt_dataset), 8, 0))


def test_a_job_whose_rollout_takes_more_prompts_than_the_dataset_has_fails_naming_the_flags(
        dataprep_address, prompt_dataset, default_model, tmp_path):
    """Seen with PPO: 16 prompts a rollout on 7 rows divided by zero rollouts an epoch (a
    ZeroDivisionError traceback) before the clear refusal could be raised."""
    from libs.common.errors import FailedPrecondition

    plugin = tmp_path / "length.py"
    plugin.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    config = TrainConfig(model=str(default_model), dataset=prompt_dataset, dataprep_address=dataprep_address,
                         output_dir=str(tmp_path / "run"), rlhf_type="grpo", per_device_train_batch_size=16,
                         grpo=GrpoConfig(num_generations=2, max_completion_length=4, reward_funcs=["length"],
                                         external_plugins=[str(plugin)], beta=0.0))
    with pytest.raises(FailedPrecondition, match="fewer prompt rows for this reader than one rollout takes \\(8: "):
        training.train(config, lambda event, **fields: None)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("checkpoint-*"))


def test_the_step_count_is_rollouts_times_updates():
    assert training.online_total(-1, 2.0, per_epoch=3, updates=2) == 12
    assert training.online_total(-1, 0.5, per_epoch=3, updates=1) == 2  # rounded up to whole rollouts
    assert training.online_total(8, 2.0, per_epoch=3, updates=2) == 8


def test_generation_seeds_are_a_stable_hash_of_seed_step_and_row():
    seeds = {(s, step, key, a): grpo.generation_seed(s, step, key, a)
             for s in (0, 42) for step in (0, 3) for key in (0, 1, 7) for a in (0, 1)}
    assert len(set(seeds.values())) == len(seeds)
    assert grpo.generation_seed(42, 3, 7) == grpo.generation_seed(42, 3, 7, 0) == seeds[(42, 3, 7, 0)]
    # pinned: a change would silently change every run's completions (and break resuming older runs exactly)
    assert grpo.generation_seed(42, 0, 0) == int(np.random.SeedSequence([42, 0, 0, 0]).generate_state(1)[0])


@pytest.fixture(scope="module")
def policy(default_model):
    config = TrainConfig(dataset="d", dataprep_address="a", output_dir="o", lora_rank=4, seed=1)
    torch.manual_seed(1)
    model = modeling.build_model(config, default_model)
    # a LoRA B of zeros changes nothing: make the adapter matter, so that eval mode (no dropout) shows
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    model.train()
    return model


def test_a_prompts_completions_depend_on_its_seed_only(policy, default_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in QUESTIONS[:3]]
    prompts = [list(p["input_ids"]) if not isinstance(p, list) else p for p in prompts]
    generator = TransformersGenerator(policy, pad_id=tokenizer.pad_token_id)
    sampling = Sampling(n=3, max_tokens=6, temperature=0.9, top_p=0.9, top_k=50,
                        stop_token_ids=grpo.stop_tokens(tokenizer, policy))
    rng = torch.get_rng_state()
    together = generator.generate(prompts, [11, 12, 13], sampling)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is left as it was
    assert policy.training  # back in train mode
    alone = generator.generate(prompts[1:2], [12], sampling)
    assert alone == together[1:2]  # neighbours and their seeds change nothing
    assert generator.generate(prompts[1:2], [99], sampling) != alone
    for group in together:
        assert len(group) == 3
        for completion in group:
            assert isinstance(completion, Completion) and 1 <= len(completion.token_ids) <= 6
            stops = [i for i, t in enumerate(completion.token_ids) if t in sampling.stop_token_ids]
            # finished: it ends on its only stop token; unfinished: max_tokens without one
            assert (stops == [len(completion.token_ids) - 1]) if completion.finished else (
                not stops and len(completion.token_ids) == 6)


FIRST_CALL_EQUAL = '''import pathlib
CALLS = pathlib.Path(__file__).with_suffix(".calls")

def varied(completions, **kwargs):
    calls = int(CALLS.read_text()) + 1 if CALLS.exists() else 1
    CALLS.write_text(str(calls))
    # the first call scores every completion alike; later ones by their characters (groups differ)
    return [0.0 if calls == 1 else float(sum(map(ord, c))) for c in completions]
'''


@pytest.mark.parametrize("equal_always", [True, False], ids=["equal-always", "equal-first"])
def test_dynamic_sample_regenerates_groups_whose_rewards_are_all_equal(equal_always, policy, default_model,
                                                                      dataprep_address, prompt_dataset, tmp_path):
    from transformers import AutoTokenizer

    plugin = tmp_path / "varied.py"
    plugin.write_text(FIRST_CALL_EQUAL.replace("calls == 1", "True") if equal_always else FIRST_CALL_EQUAL)
    config = TrainConfig(dataset=prompt_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path),
                         rlhf_type="grpo", per_device_train_batch_size=4, seed=5,
                         grpo=GrpoConfig(num_generations=2, max_completion_length=6, reward_funcs=["varied"],
                                         external_plugins=[str(plugin)], beta=0.0, dynamic_sample=True,
                                         max_resample_times=3))
    method = grpo.Grpo(config, policy, policy, AutoTokenizer.from_pretrained(default_model))
    prompts = [row for row, _ in data.DataprepRows(dataprep_address, prompt_dataset).epoch_rows(DataCursor())][:2]
    rollout = method.rollout(prompts, step=0)
    calls = int((tmp_path / "varied.calls").read_text())
    if equal_always:  # every group stays equal: tried max_resample_times more times, then kept
        assert calls == 4 and rollout.logged["frac_reward_zero_std"] == 1.0
        assert torch.equal(rollout.updates[0][0].extras["advantages"], torch.zeros(4))
    else:  # retried until they differ (the second prompt's 2nd try does; the first's has two alike texts, its 3rd
        # differs), then no more
        assert calls == 3 and rollout.logged["frac_reward_zero_std"] == 0.0
        assert not torch.equal(rollout.updates[0][0].extras["advantages"], torch.zeros(4))
    assert rollout.seconds["generation"] > 0 and len(rollout.updates) == 1 and len(rollout.updates[0]) == 1


def test_the_time_split_reaches_prometheus():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {phase: value("tuneforge_trainer_phase_seconds_total", phase=phase) for phase in metrics.PHASES}
    syncs = value("tuneforge_trainer_weight_sync_duration_seconds_count")
    metrics.observe_phases({"generation": 1.5, "reward": 0.25, "train": 0.5, "unknown": 9.0})
    metrics.observe_phases({"generation": 0.5, "sync": 0.125, "train": 0.5})
    grew = {phase: value("tuneforge_trainer_phase_seconds_total", phase=phase) - before[phase]
            for phase in metrics.PHASES}
    assert grew == {"generation": 2.0, "reward": 0.25, "reference": 0.0, "old_logps": 0.0, "sync": 0.125,
                    "train": 1.0}
    assert value("tuneforge_trainer_weight_sync_duration_seconds_count") - syncs == 1


def test_a_reward_model_scores_the_rollout_beside_a_function_with_its_weight(policy, default_model, dataprep_address,
                                                                             prompt_dataset, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.trainer.rewards.model import RewardModel

    scorer = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(default_model, num_labels=1, pad_token_id=0).save_pretrained(
        scorer)
    plugin = tmp_path / "length.py"
    plugin.write_text("def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n")
    config = TrainConfig(dataset=prompt_dataset, dataprep_address=dataprep_address, output_dir=str(tmp_path),
                         rlhf_type="grpo", per_device_train_batch_size=2, gradient_accumulation_steps=2, seed=5,
                         grpo=GrpoConfig(num_generations=2, max_completion_length=6, reward_funcs=["length"],
                                         external_plugins=[str(plugin)], reward_model=[str(scorer)],
                                         reward_weights=[0.5, 2.0], beta=0.0, log_completions=True))
    assert config.problems() == []
    method = grpo.Grpo(config, policy, policy, AutoTokenizer.from_pretrained(default_model))
    prompts = [row for row, _ in data.DataprepRows(dataprep_address, prompt_dataset).epoch_rows(DataCursor())][:2]
    rollout = method.rollout(prompts, step=0)
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 4 and all(set(c) >= {"length", "reward_model", "reward", "advantage"} for c in logged)
    # the reward model's score of each prompt + completion (the token ids trained on), as it scores them alone
    micro_batches = rollout.updates[0]
    sequences = [(ids[mask.bool()].tolist(), ids[(labels != -100) & mask.bool()].tolist())
                 for micro in micro_batches for ids, labels, mask in zip(micro.input_ids, micro.labels,
                                                                         micro.attention_mask)]
    prompt_ids = [ids[:len(ids) - len(completion)] for ids, completion in sequences]
    assert prompt_ids == [prompts[i // 2].input_ids.tolist() for i in range(4)]
    alone = RewardModel(scorer).score(prompt_ids, [completion for _, completion in sequences])
    for c, score in zip(logged, alone.tolist()):
        assert c["reward_model"] == pytest.approx(score, abs=1e-5)
        assert c["reward"] == pytest.approx(0.5 * c["length"] + 2.0 * c["reward_model"], abs=1e-5)
    assert rollout.logged["rewards/reward_model/mean"] == pytest.approx(sum(c["reward_model"] for c in logged) / 4)
    assert rollout.logged["reward"] == pytest.approx(sum(c["reward"] for c in logged) / 4, abs=1e-5)
    assert len(rollout.updates) == 1 and len(rollout.updates[0]) == 2  # 2 micro-batches of 2 completions


class Recorder:
    """An online method reduced to what the engine's driving of it shows: which prompts each
    rollout gets, at which step, and which it is told to generate ahead."""

    def __init__(self, async_generate: bool, updates: int):
        self.args = GrpoConfig(async_generate=async_generate)
        self.updates, self.calls = updates, []

    def updates_per_rollout(self) -> int:
        return self.updates

    def rollout(self, prompts, step, following=None):
        self.calls.append((prompts, step, following))
        return grpo.Rollout([[]] * self.updates)


def prompt_batches(count):
    for i in range(count):
        yield data.PromptBatch([f"row{i}"], DataCursor(), 0.0)


@pytest.mark.parametrize("async_generate", [False, True])
def test_the_engine_hands_a_generating_ahead_method_the_next_rollout_up_to_the_total(async_generate):
    method = Recorder(async_generate, updates=2)
    read = prompt_batches(10)
    steps = list(itertools.islice(training.online_steps(method, read, 2, total=8), 6))
    assert [len(steps), [s.last for s in steps]] == [6, [False, True] * 3]
    if async_generate:  # rollout k gets rollout k + 1's rows and step; none past the total
        assert method.calls == [(["row0"], 2, (["row1"], 4)), (["row1"], 4, (["row2"], 6)), (["row2"], 6, None)]
    else:
        assert method.calls == [(["row0"], 2, None), (["row1"], 4, None), (["row2"], 6, None)]
    assert next(read).rows == ["row3"]  # neither read past the last rollout trained


def test_a_rollout_generated_ahead_is_the_one_generated_now_and_survives_a_checkpoint(policy, default_model,
                                                                                       tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    generator = TransformersGenerator(policy, pad_id=tokenizer.pad_token_id)
    sampling = Sampling(n=2, max_tokens=5, temperature=0.9, top_p=0.9, top_k=50,
                        stop_token_ids=grpo.stop_tokens(tokenizer, policy))
    prompts, seeds = [[5, 6, 7, 8], [9, 10, 11]], [3, 4]
    expected = generator.generate(prompts, seeds, sampling)
    ahead = grpo.Ahead(generator)
    try:
        assert ahead.take(4, prompts, {}) is None  # nothing generated ahead: the caller generates
        ahead.start(4, prompts, seeds, sampling)
        ahead.save(tmp_path)  # waits for it, keeps it
        seconds = {}
        assert ahead.take(4, prompts, seconds) == expected
        assert seconds["generation"] > 0 and seconds["generation_wait"] >= 0 and ahead.pending is None

        resumed = grpo.Ahead(generator)
        resumed.load(tmp_path)
        assert resumed.take(4, prompts, {}) == expected  # a resumed run trains on what was generated ahead
        resumed.load(tmp_path)
        assert resumed.take(6, prompts, {}) is None  # for another rollout: not used
        resumed.load(tmp_path / "nowhere")
        assert resumed.pending is None
        resumed.close()
    finally:
        ahead.close()
