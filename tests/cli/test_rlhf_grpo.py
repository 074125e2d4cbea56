"""`tuneforge rlhf --rlhf_type grpo` end to end with in-process services: raw prompt rows (with an
extra `solution` column) prepared by dataprep's prompt task, completions generated with
transformers, a reward plugin written here that rewards short answers, and the mean reward of
the last five steps above the first five's; completions.jsonl and the time split in
logging.jsonl. And the refusals a GRPO job gets at submission, one line each, exit 2."""

import json

import pytest
from prometheus_client import REGISTRY

from cli import train as cli
from cli.main import main as tuneforge
from libs.common import checkpoint
from libs.common import config as cfg
from libs.common.errors import InvalidArgument
from services.trainer import client
from services.trainer.config import GrpoConfig, TrainConfig, from_arguments, to_arguments

PROMPTS = [("who are you?", "Ada"), ("What is your name?", "Ada"), ("Introduce yourself.", "Ada"),
           ("Who made you?", "Bo"), ("Tell me a story.", "once"), ("What can you do?", "help")]
STEPS = 20
# every completion's reward is minus its length in tokens; the solution column reaches it as a keyword
SHORT = '''def short(completions, completion_ids, solution, **kwargs):
    assert len(solution) == len(completions) and all(isinstance(s, str) for s in solution)
    return [-float(len(ids)) for ids in completion_ids]
'''


def write_prompts(path, rows=PROMPTS):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "solution": s}) + "\n"
                            for q, s in rows))
    return path


def write_plugin(path, text=SHORT):
    path.write_text(text)
    return path


@pytest.mark.slow
def test_grpo_learns_to_answer_short(tmp_path, capsys):
    raw, plugin, run = write_prompts(tmp_path / "prompts.jsonl"), write_plugin(tmp_path / "short.py"), tmp_path / "run"
    phases = lambda: {phase: REGISTRY.get_sample_value("tuneforge_trainer_phase_seconds_total",  # noqa: E731
                                                       {"phase": phase}) or 0.0 for phase in ("generation", "train")}
    before = phases()
    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(run),
                      "--external_plugins", str(plugin), "--reward_funcs", "short",
                      # 2 prompts x 4 completions a step, 12 tokens at most; no reference (beta 0): faster
                      "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "12",
                      "--max_steps", str(STEPS), "--learning_rate", "3e-3", "--beta", "0", "--lora_rank", "8",
                      "--log_completions", "true"])
    _out, err = capsys.readouterr()
    assert code == 0, err
    logged = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged] == list(range(1, STEPS + 1))
    rewards = [e["reward"] for e in logged]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"mean reward (minus completion tokens): first five steps {first:.2f}, last five {last:.2f}")
    assert last > first + 2, rewards  # measured here: -10.82 -> -4.97
    assert all(e["rewards/short/mean"] == e["reward"] for e in logged)
    # the time split of each step: generation, reward, train (no reference with beta 0, no sync with transformers)
    assert all(e["generation_seconds"] > 0 and e["reward_seconds"] > 0 and e["train_seconds"] > 0 for e in logged)
    assert not any("reference_seconds" in e or "sync_seconds" in e for e in logged)
    # ... and on the (in-process) trainer service's Prometheus page, as the job reported them
    grew = {phase: seconds - before[phase] for phase, seconds in phases().items()}
    assert grew["generation"] == pytest.approx(sum(e["generation_seconds"] for e in logged))
    assert grew["train"] == pytest.approx(sum(e["train_seconds"] for e in logged))
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == STEPS * 8 and [c["step"] for c in completions[::8]] == list(range(1, STEPS + 1))
    assert all(c["reward"] == c["short"] and c["prompt"].endswith("<|im_start|>assistant\n") for c in completions)
    final = run / f"checkpoint-{STEPS}"
    checkpoint.verify(final)
    assert json.loads((final / "args.json").read_text())["grpo"]["reward_funcs"] == ["short"]


def test_grpo_refusals_name_their_flags(tmp_path, capsys):
    raw, run = write_prompts(tmp_path / "prompts.jsonl"), str(tmp_path / "run")
    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", run,
                      "--num_generations", "1", "--split_dataset_ratio", "0.2", "--use_vllm", "true",
                      "--vllm_mode", "server"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines() == [
        "tuneforge rlhf: error: num_generations: a group needs at least 2 completions (advantages compare them); got 1",
        "tuneforge rlhf: error: reward_funcs: an online method needs a reward: give --reward_funcs NAME ... (built in: "
        "accuracy, format, cosine, repetition, soft_overlong; or a function of --external_plugins) or --reward_model "
        "PATH",
        "tuneforge rlhf: error: vllm_server_host: vllm_mode server needs the serving service's host "
        "(--vllm_server_host, --vllm_server_port)",
        "tuneforge rlhf: error: split_dataset_ratio: rlhf_type grpo has no eval loss (it trains on its own "
        "generations)"]

    plugin = write_plugin(tmp_path / "short.py")
    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", run,
                      "--num_generations", "4", "--per_device_train_batch_size", "6", "--reward_funcs", "short",
                      "--external_plugins", str(plugin), str(tmp_path / "missing.py"), "--max_steps", "3",
                      "--num_iterations", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [
        f"tuneforge rlhf: error: external_plugins: {tmp_path / 'missing.py'}: no such file",
        "tuneforge rlhf: error: per_device_train_batch_size: counts completions: per_device_train_batch_size x "
        "gradient_accumulation_steps (6 x 1 = 6) must be a multiple of num_generations (4), so that each rank "
        "generates whole groups",
        "tuneforge rlhf: error: max_steps: must be a multiple of num_iterations (2): each rollout trains that many "
        "steps; got 3"]

    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", run,
                      "--num_generations", "2", "--per_device_train_batch_size", "2", "--reward_funcs", "shorter",
                      "--external_plugins", str(plugin), "--deepspeed", "zero3", "--nproc_per_node", "2",
                      "--use_vllm", "true"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"reward_funcs: 'shorter' is neither a built-in reward" in err and f"{plugin} defines short" in err, err
    assert ("deepspeed: rlhf_type grpo generates with each rank's whole policy: use DDP or --deepspeed zero2 (ZeRO-3 "
            "and FSDP2 are not supported for online methods yet)") in err
    assert ("vllm_mode: colocate runs one vLLM engine inside a single training process; this job has 2 "
            "(nproc_per_node x nnodes): use --vllm_mode server") in err

    # the generation flags are the online methods' only
    code = tuneforge(["rlhf", "--rlhf_type", "dpo", "--dataset", str(raw), "--output_dir", run, "--use_vllm", "true",
                      "--num_generations", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "tuneforge rlhf: error: num_generations: not an argument of rlhf_type dpo",
        "tuneforge rlhf: error: use_vllm: only for the online methods (grpo, ppo, gkd), which generate; rlhf_type is dpo"], err
    assert not (tmp_path / "run").exists()  # refused before anything was prepared


def test_the_trainer_service_refuses_grpo_without_a_reward(trainer, tmp_path):
    config = TrainConfig(dataset=str(tmp_path), dataprep_address="127.0.0.1:1", output_dir=str(tmp_path / "run"),
                         rlhf_type="grpo", per_device_train_batch_size=8)
    with pytest.raises(InvalidArgument) as refused:  # INVALID_ARGUMENT on the wire
        client.submit(trainer.address, config)
    assert str(refused.value).startswith("grpo.reward_funcs: an online method needs a reward: give --reward_funcs")


def test_grpo_flags_reach_the_job_through_the_trainer_proto(tmp_path):
    raw, plugin = write_prompts(tmp_path / "prompts.jsonl"), write_plugin(tmp_path / "short.py")
    command = cfg.parse(cli.RlhfCommandConfig, [
        "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_generations", "4",
        "--max_completion_length", "64", "--temperature", "1.0", "--top_p", "0.95", "--top_k", "-1",
        "--reward_funcs", "short", "format", "--reward_weights", "1", "0.5", "--external_plugins", str(plugin),
        "--loss_type", "dapo", "--epsilon", "0.2", "--epsilon_high", "0.28", "--beta", "0", "--num_iterations", "2",
        "--scale_rewards", "batch", "--dynamic_sample", "true", "--max_resample_times", "2",
        "--log_completions", "true", "--repetition_n_grams", "4", "--use_vllm", "true", "--vllm_mode", "server",
        "--vllm_server_host", "127.0.0.1", "--vllm_server_port", "50051"])
    assert cli.prepare_config(command, [str(raw)], tmp_path / "out").task == "prompt"
    job = from_arguments(to_arguments(cli.job_config(command, str(tmp_path / "prepared"), "127.0.0.1:1")))
    assert job.grpo == GrpoConfig(
        num_generations=4, max_completion_length=64, temperature=1.0, top_p=0.95, top_k=-1,
        reward_funcs=["short", "format"], reward_weights=[1.0, 0.5], external_plugins=[str(plugin.resolve())],
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=2, scale_rewards="batch",
        dynamic_sample=True, max_resample_times=2, log_completions=True, repetition_n_grams=4)
    assert (job.use_vllm, job.vllm_mode, job.vllm_server_host, job.vllm_server_port) == (
        True, "server", "127.0.0.1", 50051)


@pytest.mark.slow
def test_a_reward_function_that_raises_fails_the_job_with_one_line_naming_it_and_the_row(tmp_path, capsys):
    raw = write_prompts(tmp_path / "prompts.jsonl")
    plugin = write_plugin(tmp_path / "bad.py", "def bad(completions, solution, **kwargs):\n"
                                               "    return [1.0 / (s == 'once') for s in solution]\n")
    code = tuneforge(["rlhf", "--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
                      "--external_plugins", str(plugin), "--reward_funcs", "bad", "--num_generations", "2",
                      "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--max_steps", "2",
                      "--dataset_shuffle", "false"])  # file order: the first rollout's row is row 0
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    failed = [line for line in err.splitlines() if line.startswith("tuneforge rlhf: error:")]
    assert len(failed) == 1 and failed[0].endswith(
        f"failed: reward_funcs: reward function 'bad' ({plugin}) raised ZeroDivisionError: float division by zero "
        f"(at {plugin}:2), scoring the completions of row 0 of {tmp_path / 'run' / 'dataset'}"), err


def test_async_generate_reaches_the_job_and_is_refused_where_it_cannot_hold(tmp_path, capsys):
    raw, plugin = write_prompts(tmp_path / "prompts.jsonl"), write_plugin(tmp_path / "short.py")
    base = ["--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
            "--num_generations", "2", "--per_device_train_batch_size", "4", "--reward_funcs", "short",
            "--external_plugins", str(plugin), "--async_generate", "true"]
    command = cfg.parse(cli.RlhfCommandConfig, [*base, "--use_vllm", "true", "--vllm_mode", "server",
                                                "--vllm_server_host", "127.0.0.1"])
    job = from_arguments(to_arguments(cli.job_config(command, str(tmp_path / "prepared"), "127.0.0.1:1")))
    assert job.grpo.async_generate is True and GrpoConfig().async_generate is False

    code = tuneforge(["rlhf", *base, "--dynamic_sample", "true"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [
        "tuneforge rlhf: error: async_generate: not with dynamic_sample (regenerating a group would share the engine "
        "with the rollout generated ahead)",
        "tuneforge rlhf: error: async_generate: needs use_vllm (colocate or server): transformers generation samples "
        "from the policy itself, which trains meanwhile"]
    code = tuneforge(["rlhf", *base, "--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_host", "127.0.0.1",
                      "--nproc_per_node", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "tuneforge rlhf: error: async_generate: one process only for now (the in-flight rollout a checkpoint keeps "
        "is one rank's); got nproc_per_node x nnodes = 2"], err
    assert not (tmp_path / "run").exists()


def test_vllm_enable_lora_reaches_the_job_picks_the_sync_and_is_refused_where_it_cannot_hold(tmp_path, capsys):
    from services.trainer.rollout import merges_lora

    raw, plugin = write_prompts(tmp_path / "prompts.jsonl"), write_plugin(tmp_path / "short.py")
    base = ["--rlhf_type", "grpo", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
            "--num_generations", "2", "--per_device_train_batch_size", "4", "--reward_funcs", "short",
            "--external_plugins", str(plugin), "--use_vllm", "true"]

    def job(*flags):
        command = cfg.parse(cli.RlhfCommandConfig, [*base, *flags])
        return from_arguments(to_arguments(cli.job_config(command, str(tmp_path / "prepared"), "127.0.0.1:1")))

    # unset: a lora policy merged into the colocated engine's weights, the adapter otherwise
    assert job().vllm_enable_lora is None and merges_lora(job())
    assert job("--vllm_enable_lora", "true").vllm_enable_lora is True and not merges_lora(
        job("--vllm_enable_lora", "true"))
    assert job("--vllm_enable_lora", "false").vllm_enable_lora is False and merges_lora(
        job("--vllm_enable_lora", "false"))
    assert not merges_lora(job("--train_type", "qlora"))

    code = tuneforge(["rlhf", *base, "--vllm_enable_lora", "false", "--vllm_mode", "server",
                      "--vllm_server_host", "127.0.0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "tuneforge rlhf: error: vllm_enable_lora: vllm_mode server syncs the policy as an adapter (merged weights "
        "cannot reach a separate engine on CPU): leave it unset or true, or use --vllm_mode colocate"], err
    code = tuneforge(["rlhf", *base, "--vllm_enable_lora", "true", "--train_type", "full"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines() == [
        "tuneforge rlhf: error: vllm_enable_lora: only for LoRA policies; train_type is full (its weights are "
        "loaded into vLLM whole)"], err
    # false is a value too: on a method that does not generate it is refused like true
    dpo = [flag if flag != "grpo" else "dpo" for flag in base[:4]]
    code = tuneforge(["rlhf", *dpo, "--vllm_enable_lora", "false"])
    err = capsys.readouterr().err
    assert code == 2 and "tuneforge rlhf: error: vllm_enable_lora: only for the online methods" in err, err
    assert not (tmp_path / "run").exists()
