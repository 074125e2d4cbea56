"""`tuneforge rlhf --rlhf_type rm` end to end: a LoRA reward model on the default model learns
to rank its training pairs (pair accuracy from about 0.5 to at least 0.9), and flags that are
not the reward model's are refused, one line each, exit 2."""

import json

import pytest

from cli.main import main as tuneforge

# (question, right answer, wrong answer): the wrong ones are never right elsewhere, and the two
# sides use the same sentence, so a fresh head ranks them by chance (accuracy ~0.5)
FACTS = [("What is the capital of France?", "Paris", "Madrid"), ("How many legs does a spider have?", "eight", "three"),
         ("What colour is the sky on a clear day?", "blue", "green"), ("What is two plus two?", "four", "nine"),
         ("Which planet is closest to the sun?", "Mercury", "Jupiter"), ("What do bees make?", "honey", "milk"),
         ("How many days are in a week?", "seven", "twelve"), ("What is frozen water called?", "ice", "steam"),
         ("Which animal is called the king of the jungle?", "the lion", "the mouse"),
         ("At what temperature does water boil?", "100 degrees Celsius", "20 degrees Celsius"),
         ("How many continents are there?", "seven", "forty"), ("What gas do plants take in?", "carbon dioxide", "helium"),
         ("Who wrote Romeo and Juliet?", "Shakespeare", "Newton"), ("What is the largest ocean?", "the Pacific", "Lake Geneva"),
         ("How many hours are in a day?", "twenty-four", "five"), ("What is the opposite of hot?", "cold", "loud")]


def test_flags_of_other_methods_are_refused_one_line_each(tmp_path, capsys):
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("{}\n")
    code = tuneforge(["rlhf", "--rlhf_type", "rm", "--dataset", str(raw), "--output_dir", str(tmp_path / "run"),
                      "--loss_type", "sigmoid", "--beta", "0.5", "--center_rewards_coefficient", "-1"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert lines == ["tuneforge rlhf: error: beta: not an argument of rlhf_type rm",
                     "tuneforge rlhf: error: loss_type: not an argument of rlhf_type rm",
                     "tuneforge rlhf: error: center_rewards_coefficient: must not be negative; got -1.0"]


@pytest.mark.slow
def test_reward_model_learns_to_rank_its_pairs(trainer, dataprep_address, tmp_path, capsys):
    raw = tmp_path / "pairs.jsonl"
    raw.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": f"The answer is {right}."}],
                                       "rejected_response": f"The answer is {wrong}."}) + "\n"
                           for q, right, wrong in FACTS))
    run = tmp_path / "run"
    # one step is every pair (its logged accuracy is the fresh model's); the eval set is the same pairs
    code = tuneforge(["rlhf", "--rlhf_type", "rm", "--dataset", str(raw), "--val_dataset", str(raw),
                      "--output_dir", str(run), "--per_device_train_batch_size", "16", "--max_steps", "8",
                      "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--lora_dropout", "0",
                      "--trainer_address", trainer.address, "--dataprep_address", dataprep_address])
    err = capsys.readouterr().err
    assert code == 0, err
    entries = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    steps = [e for e in entries if "loss" in e]
    final = next(e for e in entries if "eval_accuracy" in e)
    print(f"pair accuracy {steps[0]['accuracy']:.3f} at step 1 -> {steps[-1]['accuracy']:.3f} at step "
          f"{steps[-1]['step']}; eval {final['eval_accuracy']:.3f}, eval margin {final['eval_rewards/margins']:.2f}")
    assert 0.3 <= steps[0]["accuracy"] <= 0.7, steps[0]
    assert final["step"] == 8 and final["eval_rows"] == len(FACTS)
    assert final["eval_accuracy"] >= 0.9 and final["eval_rewards/margins"] > 1.0
    assert "eval_accuracy" in err  # the progress bar's eval line shows it too
