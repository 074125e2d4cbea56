"""`tuneforge rlhf --rlhf_type ppo|gkd`: what each is refused for before anything is submitted (a
missing reward model or teacher, another method's flags, values out of range), one line each, exit 2.
Training itself is tested in tests/services/trainer/test_ppo_gkd.py."""

from cli.main import main as tuneforge


def test_ppo_and_gkd_flags_are_checked_one_line_each(tmp_path, capsys):
    raw = tmp_path / "prompts.jsonl"
    raw.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    common = ["--dataset", str(raw), "--output_dir", str(tmp_path / "run")]
    assert tuneforge(["rlhf", "--rlhf_type", "ppo", *common, "--num_generations", "4", "--kl_coef", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tuneforge rlhf: error: num_generations: not an argument of rlhf_type ppo",
        "tuneforge rlhf: error: reward_model: required (a checkpoint of `tuneforge rlhf --rlhf_type rm`)",
        "tuneforge rlhf: error: kl_coef: must not be negative; got -1.0"]
    assert tuneforge(["rlhf", "--rlhf_type", "gkd", *common, "--lmbda", "2", "--cliprange", "0.1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tuneforge rlhf: error: cliprange: not an argument of rlhf_type gkd",
        "tuneforge rlhf: error: teacher_model: required (a model directory with the student's vocabulary)",
        "tuneforge rlhf: error: lmbda: must be in [0, 1]; got 2.0"]
