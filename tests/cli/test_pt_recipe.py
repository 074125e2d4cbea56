"""The Chinese-LLaMA continued pre-training recipe end to end at toy scale, with the flag names of
its `run_clm_pt_with_peft.py` and ms-swift: a directory of .txt files, a tokenizer extended in the
test, LoRA r8 alpha 32 on every projection plus whole embed_tokens and lm_head, blocks of 128
tokens, DeepSpeed ZeRO-2 on 2 processes; then merge, and vLLM answers from the merged model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import train as cli
from cli.main import main as tuneforge
from libs.default_model.resolve import resolve_model

NEW_WORDS = ["zorblaxian", "quuxotic", "flimbrel", "wendlewort"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]


def corpus(directory) -> None:
    """Six documents of about 300 tokens each: at least 12 blocks of 128 for 3 steps of 2 ranks."""
    directory.mkdir()
    for index in range(6):
        sentences = [f"Chapter {index}, line {line}: the {NEW_WORDS[(index + line) % 4]} traveller met a "
                     f"{NEW_WORDS[line % 4]} merchant by the river, and they talked until dark."
                     for line in range(12)]
        (directory / f"book-{index}.txt").write_text("\n".join(sentences) + "\n")


@pytest.mark.slow
def test_the_chinese_llama_recipe_runs_end_to_end_and_vllm_serves_the_merged_model(tmp_path, capsys):
    # 105 s on the 2-core box (train 34 s on 2 processes, export 8 s, `tuneforge infer` 52 s), up to
    # 6.5 min while other tests shared the cores
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    base = len(tokenizer)
    assert tokenizer.add_tokens(NEW_WORDS) == len(NEW_WORDS)
    tokenizer_dir = tmp_path / "merged_tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    corpus(tmp_path / "corpus")
    run = tmp_path / "run"

    started = time.perf_counter()
    code = tuneforge([
        "pt", "--dataset", str(tmp_path / "corpus"), "--tokenizer_name_or_path", str(tokenizer_dir),
        "--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0.05",
        "--target_modules", *PROJECTIONS, "--modules_to_save", "embed_tokens", "lm_head",
        "--block_size", "128", "--deepspeed", "zero2", "--nproc_per_node", "2",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2", "--learning_rate", "2e-4",
        "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1", "--output_dir", str(run)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    trained = time.perf_counter()
    steps = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    assert [row["step"] for row in steps if "loss" in row] == [1, 2, 3]
    assert ("tuneforge pt: note: --tokenizer_name_or_path is run_clm's name for --tokenizer: read as --tokenizer "
            f"{tokenizer_dir}") in err.splitlines()

    manifest = json.loads((run / cli.PREPARED_SUBDIR / "manifest.json").read_text())["pt"]
    assert (manifest["mode"], manifest["block_size"], manifest["documents"]) == ("blocks", 128, 6)
    assert manifest["tokens_in"] == manifest["tokens_out"] + sum(manifest["tokens_dropped"].values())
    assert manifest["blocks"] >= 12

    checkpoint = run / "checkpoint-3"
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 32)
    assert sorted(adapter_config["target_modules"]) == sorted(PROJECTIONS)
    assert sorted(adapter_config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    weights = load_file(checkpoint / "adapter_model.safetensors")
    whole = {k: t.shape[0] for k, t in weights.items() if "embed_tokens" in k or "lm_head" in k}
    assert whole and set(whole.values()) == {base + len(NEW_WORDS)}, whole
    assert {p for p in PROJECTIONS if any(f"{p}.lora_A" in k for k in weights)} == set(PROJECTIONS)

    merged = tmp_path / "merged"
    assert tuneforge(["export", "--adapters", str(checkpoint), "--merge_lora", "true",
                      "--output_dir", str(merged)]) == 0, capsys.readouterr().err
    assert json.loads((merged / "config.json").read_text())["vocab_size"] == base + len(NEW_WORDS)
    exported = time.perf_counter()

    # The prompt holds the new words: vLLM must embed token ids past the base vocabulary.
    messages = [{"role": "user", "content": f"Tell me about the {NEW_WORDS[0]} and the {NEW_WORDS[2]} merchant."}]
    merged_tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt = merged_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)["input_ids"]
    assert {base, base + 2} <= set(prompt[0].tolist())
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt))
    expected = merged_tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True)
    assert expected.strip(), generated  # a real answer to compare, not two empty strings

    rows, out = tmp_path / "ask.jsonl", tmp_path / "answers.jsonl"
    rows.write_text(json.dumps({"messages": messages}) + "\n")
    # `tuneforge infer` starts its own vLLM engine: in a subprocess, never a second one in this session
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "infer", "--model", str(merged), "--val_dataset", str(rows),
         "--result_path", str(out), "--max_new_tokens", "8", "--max_model_len", "256"],
        capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(out.read_text().splitlines()[0])
    assert answer["response"] == expected, (answer, expected)
    print(f"recipe: train {trained - started:.0f} s, export {exported - trained:.0f} s, "
          f"infer {time.perf_counter() - exported:.0f} s; answer {expected!r}")
