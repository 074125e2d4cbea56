"""PPO and GKD (services.trainer.methods.ppo / gkd) through the real loop (training.train), real
dataprep over gRPC and real checkpoints: what a job is refused for at submission, PPO raising the
score of a reward model trained here, its value model published beside the policy and restored
on resume (the steps after a resume repeat the uninterrupted run), and GKD lowering the student's
divergence to a teacher (an SFT LoRA adapter trained here)."""

from __future__ import annotations

import json
import pathlib
import shutil
import threading

import pytest

from libs.common import checkpoint
from libs.dataset import client as dataprep_client
from services.dataprep.config import PrepareConfig
from services.trainer import training
from services.trainer.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What colour is the sky?",
             "What is two plus two?", "Which planet is closest to the sun?", "What do bees make?",
             "How many days are in a week?", "What is frozen water called?"]
# the reward model learns to prefer an answer opening with "The" to the same one opening with "No": on the
# default model's sampled completions (16% open with "The") it scores those about 0.9 higher, a signal a
# policy can find in a few rollouts
BODIES = ["sun warms the water", "heart pumps the blood", "early bird gets the worm", "sky is blue today",
          "earth goes round the sun", "bees make the honey", "week has seven days", "ice is frozen water"]


def prepare(dataprep_address, default_model, root: pathlib.Path, name: str, rows: list[dict], task: str) -> str:
    raw = root / f"{name}.jsonl"
    raw.write_text("".join(json.dumps(row) + "\n" for row in rows))
    manifest = dataprep_client.prepare(dataprep_address, PrepareConfig(
        model=str(default_model), dataset=[str(raw)], output_dir=str(root / name), task=task))
    assert manifest["rows_out"] == len(rows)
    return str(root / name)


@pytest.fixture(scope="module")
def datasets(dataprep_address, default_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ppo-gkd-data")
    user = [{"role": "user", "content": q} for q in QUESTIONS]
    return {
        # each question twice: 16 prompt rows, each generated from its own seed (its row key)
        "prompts": prepare(dataprep_address, default_model, root, "prompts", [{"messages": [u]} for u in user * 2],
                           "prompt"),
        "pairs": prepare(dataprep_address, default_model, root, "pairs",
                         [{"messages": [u, {"role": "assistant", "content": f"The {body}."}],
                           "rejected_response": f"No {body}."} for u, body in zip(user, BODIES)], "reward"),
        "sft": prepare(dataprep_address, default_model, root, "sft",
                       [{"messages": [u, {"role": "assistant", "content": f"The answer to that is {i}."}]}
                        for i, u in enumerate(user)], "sft"),
    }


def run(config: TrainConfig, stop_after: int | None = None) -> list[dict]:
    """training.train; with `stop_after`, asked to stop then (it publishes at the rollout's end)
    and resumed from that checkpoint into the same directory. Returns the logged steps."""
    stop = threading.Event()

    def report(event: str, **fields) -> None:
        if event == "progress" and fields["step"] == stop_after:
            stop.set()

    training.train(config, report, stop)
    if stop_after is not None:
        config.resume_from_checkpoint = str(checkpoint.checkpoints(config.output_dir)[-1])
        training.train(config, lambda *_a, **_k: None)
    lines = (pathlib.Path(config.output_dir) / "logging.jsonl").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


@pytest.fixture(scope="module")
def reward_model(datasets, dataprep_address, tmp_path_factory) -> str:
    """A LoRA reward model preferring "The ..." to "No ..." (pair accuracy 1 on its pairs)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    logged = run(TrainConfig(dataset=datasets["pairs"], dataprep_address=dataprep_address, output_dir=str(out),
                             rlhf_type="rm", per_device_train_batch_size=8, max_steps=6, save_steps=100,
                             learning_rate=3e-3, lr_scheduler_type="constant", lora_dropout=0.0, seed=1))
    assert logged[-1]["accuracy"] == 1.0
    return str(checkpoint.checkpoints(out)[-1])


@pytest.fixture(scope="module")
def teacher_adapter(datasets, dataprep_address, tmp_path_factory) -> str:
    """An SFT LoRA adapter on the default model, trained on the sft rows' answers."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    run(TrainConfig(dataset=datasets["sft"], dataprep_address=dataprep_address, output_dir=str(out),
                    per_device_train_batch_size=4, max_steps=20, save_steps=100, learning_rate=3e-3,
                    lr_scheduler_type="constant", lora_dropout=0.0, seed=1))
    return str(checkpoint.checkpoints(out)[-1])


def ppo_job(datasets, dataprep_address, reward_model, out, **overrides) -> TrainConfig:
    values = dict(dataset=datasets["prompts"], dataprep_address=dataprep_address, output_dir=str(out),
                  rlhf_type="ppo", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8,
                  save_steps=100, learning_rate=1e-3, lr_scheduler_type="constant", lora_dropout=0.0, seed=5)
    ppo = dict(reward_model=[reward_model], max_completion_length=12, num_ppo_epochs=2)
    config = TrainConfig(**{**values, **overrides.pop("job", {})})
    for name, value in {**ppo, **overrides}.items():
        setattr(config.ppo, name, value)
    return config


# --- refused at submission

def test_ppo_without_a_reward_model_and_gkd_without_a_teacher_are_refused(datasets, dataprep_address, tmp_path):
    common = dict(dataset=datasets["prompts"], dataprep_address=dataprep_address, output_dir=str(tmp_path / "o"))
    assert "ppo.reward_model: required (a checkpoint of `tuneforge rlhf --rlhf_type rm`)" in TrainConfig(
        rlhf_type="ppo", **common).problems()
    assert "gkd.teacher_model: required (a model directory with the student's vocabulary)" in TrainConfig(
        rlhf_type="gkd", **common).problems()


def test_a_teacher_with_another_vocabulary_and_a_reward_model_that_is_not_one_are_refused(
        datasets, dataprep_address, default_model, teacher_adapter, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-vocabulary"
    shutil.copytree(default_model, other)
    tokenizer = AutoTokenizer.from_pretrained(default_model)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(other)
    job = TrainConfig(rlhf_type="gkd", dataset=datasets["sft"], dataprep_address=dataprep_address,
                      output_dir=str(tmp_path / "o"))
    job.gkd.teacher_model = str(other)
    assert [p for p in job.problems() if p.startswith("teacher_model")] == [
        "teacher_model: its tokenizer differs from the model's (3073 tokens, the model's 3072): vocabulary mismatch: "
        "the teacher's and the student's next-token distributions must be over the same token ids"]
    job = TrainConfig(rlhf_type="ppo", dataset=datasets["prompts"], dataprep_address=dataprep_address,
                      output_dir=str(tmp_path / "o"))
    job.ppo.reward_model = [teacher_adapter]  # an SFT adapter: a causal LM's, no reward head
    assert [p for p in job.problems() if p.startswith("reward_model")] == [
        f"reward_model: {pathlib.Path(teacher_adapter).resolve()} is a LoRA adapter of task CAUSAL_LM, not a reward "
        f"model (SEQ_CLS, from `tuneforge rlhf --rlhf_type rm`)"]


def test_gkd_on_prompts_without_answers_needs_lmbda_one_or_seq_kd(datasets, dataprep_address, default_model, tmp_path):
    from services.trainer import dataset_check

    job = TrainConfig(rlhf_type="gkd", dataset=datasets["prompts"], dataprep_address=dataprep_address,
                      output_dir=str(tmp_path / "o"))
    job.gkd.teacher_model = str(default_model)
    assert dataset_check.problems(job) == [
        f"dataset: {datasets['prompts']} holds prompt rows without answers; rlhf_type gkd trains on the dataset's "
        f"answers on a share 1 - lmbda of its steps (lmbda 0.5): give conversations with answers (task sft), or "
        f"--lmbda 1 or --seq_kd true"]
    job.gkd.lmbda = 1.0
    assert dataset_check.problems(job) == []


def test_gkd_refuses_packed_rows(dataprep_address, default_model, tmp_path):
    from services.trainer import dataset_check

    raw = tmp_path / "sft.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": "Yes."}]}) + "\n"
                           for q in QUESTIONS))
    dataprep_client.prepare(dataprep_address, PrepareConfig(model=str(default_model), dataset=[str(raw)],
                                                            output_dir=str(tmp_path / "packed"), packing=True,
                                                            max_length=128))
    job = TrainConfig(rlhf_type="gkd", dataset=str(tmp_path / "packed"), dataprep_address=dataprep_address,
                      output_dir=str(tmp_path / "o"))
    job.gkd.teacher_model = str(default_model)
    assert dataset_check.problems(job) == [
        f"dataset: {tmp_path / 'packed'} was prepared with packing; rlhf_type gkd takes each row's prompt and answer "
        f"apart: prepare it without --packing"]


# --- learning, checkpoints, resume

@pytest.mark.slow
def test_ppo_raises_the_reward_models_score(datasets, dataprep_address, reward_model, tmp_path):
    """16 completions of 4 tokens a rollout, 4 PPO epochs over each: 10 rollouts, 40 steps."""
    logged = run(ppo_job(datasets, dataprep_address, reward_model, tmp_path / "run", max_completion_length=4,
                         num_ppo_epochs=4, job={"max_steps": 40, "learning_rate": 2e-3,
                                                "per_device_train_batch_size": 8}))
    scores = [e["objective/scores"] for e in logged[::4]]  # each rollout's (logged with each of its 4 steps)
    first, last = sum(scores[:2]) / 2, sum(scores[-2:]) / 2
    print(f"ppo: reward model score {first:.3f} (first 2 rollouts) -> {last:.3f} (last 2); per rollout "
          f"{[round(s, 3) for s in scores]}; kl {logged[-1]['objective/kl']:.2f}")
    assert last > first + 0.5


@pytest.mark.slow
@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_ppo_publishes_its_value_model_and_a_resume_repeats_the_uninterrupted_run(datasets, dataprep_address,
                                                                                  reward_model, train_type, tmp_path):
    job = {"train_type": train_type, **({"learning_rate": 1e-4} if train_type == "full" else {})}
    whole = run(ppo_job(datasets, dataprep_address, reward_model, tmp_path / "whole", job=job))
    resumed = run(ppo_job(datasets, dataprep_address, reward_model, tmp_path / "resumed", job=job), stop_after=2)
    names = ("step", "loss", "grad_norm", "loss/policy_avg", "loss/value_avg", "objective/scores", "objective/kl")
    assert [e["step"] for e in whole] == list(range(1, 9))
    assert [[e[n] for n in names] for e in resumed] == [[e[n] for n in names] for e in whole]
    final = checkpoint.checkpoints(tmp_path / "whole")[-1]
    assert (final / "value_model" / "optimizer.pt").is_file()
    if train_type == "lora":  # beside the policy's adapter: the value model's adapter on the reward model it names
        assert (final / "adapter_config.json").is_file()
        config = json.loads((final / "value_model" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS"
        assert config["base_model_name_or_path"] == str(pathlib.Path(reward_model).resolve())
    else:  # beside the policy's whole model: a whole sequence-classification model
        from transformers import AutoModelForSequenceClassification

        assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        assert AutoModelForSequenceClassification.from_pretrained(final / "value_model").config.num_labels == 1


@pytest.mark.slow
def test_gkd_lowers_the_students_divergence_to_the_teacher(datasets, dataprep_address, default_model,
                                                          teacher_adapter, tmp_path):
    job = TrainConfig(dataset=datasets["sft"], dataprep_address=dataprep_address, output_dir=str(tmp_path / "run"),
                      rlhf_type="gkd", per_device_train_batch_size=4, max_steps=16, save_steps=100,
                      learning_rate=3e-3, lr_scheduler_type="constant", lora_dropout=0.0, seed=2)
    job.gkd.teacher_model, job.gkd.teacher_adapters = str(default_model), [teacher_adapter]
    job.gkd.max_completion_length = 12
    logged = run(job)
    on_policy = [e["on_policy"] for e in logged]
    assert 0 < sum(on_policy) < len(on_policy)  # lmbda 0.5: both kinds of step
    dataset_steps = [e["jsd"] for e in logged if e["on_policy"] == 0]
    print(f"gkd: jsd on the dataset's answers {dataset_steps[0]:.4f} -> {dataset_steps[-1]:.4f} "
          f"({len(dataset_steps)} of {len(logged)} steps; the others on-policy)")
    assert dataset_steps[-1] < 0.5 * dataset_steps[0]
    # stopped after step 5 and resumed: the same steps on-policy, the same generations, the same losses
    job.output_dir, job.max_steps = str(tmp_path / "resumed"), 8
    resumed = run(job, stop_after=5)
    names = ("step", "loss", "jsd", "on_policy", "grad_norm")
    assert [[e[n] for n in names] for e in resumed] == [[e[n] for n in names] for e in logged[:8]]


@pytest.mark.slow
def test_gkd_with_seq_kd_trains_on_the_teachers_generations_of_prompt_rows(datasets, dataprep_address, default_model,
                                                                          teacher_adapter, tmp_path):
    """lmbda 0 and --seq_kd: every step on the teacher's own completions of prompt rows (no answers
    in the data), with sft_alpha x their NLL added."""
    job = TrainConfig(dataset=datasets["prompts"], dataprep_address=dataprep_address,
                      output_dir=str(tmp_path / "run"), rlhf_type="gkd", per_device_train_batch_size=8, max_steps=6,
                      save_steps=100, learning_rate=3e-3, lr_scheduler_type="constant", lora_dropout=0.0, seed=2)
    job.gkd.teacher_model, job.gkd.teacher_adapters = str(default_model), [teacher_adapter]
    job.gkd.lmbda, job.gkd.seq_kd, job.gkd.sft_alpha, job.gkd.max_completion_length = 0.0, True, 0.5, 8
    logged = run(job)
    assert [e["on_policy"] for e in logged] == [0.0] * 6
    assert all(e["nll_loss"] > 0 for e in logged)
    for e in logged:  # the loss is the divergence plus sft_alpha x the NLL of the teacher's answers
        assert e["loss"] == pytest.approx(e["jsd"] + 0.5 * e["nll_loss"], rel=1e-5)
    print(f"gkd --seq_kd: jsd {logged[0]['jsd']:.4f} -> {logged[-1]['jsd']:.4f}, nll {logged[0]['nll_loss']:.3f} -> "
          f"{logged[-1]['nll_loss']:.3f}")
    assert logged[-1]["jsd"] < logged[0]["jsd"]
