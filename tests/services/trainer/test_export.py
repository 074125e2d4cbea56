"""`tuneforge export --merge_lora true`: the merged model computes what base + adapter
computes (logits within 1e-4), is a complete Hugging Face directory with a verified
manifest, loads in vLLM with the same greedy output, and user mistakes are one line, exit 2."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from cli.main import main as tuneforge
from libs.common import checkpoint

PROMPT = "<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n"


def make_adapter(base_dir: pathlib.Path, out: pathlib.Path, seed: int = 0, std: float = 0.05,
                 modules_to_save: list[str] | None = None) -> pathlib.Path:
    """A LoRA adapter on `base_dir` whose B matrices are random (not PEFT's zeros), so the
    merge changes every adapted weight; saved as the trainer saves one (PEFT files + args.json)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            modules_to_save=modules_to_save, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
            elif "modules_to_save" in name:  # a module trained whole
                param.add_(torch.randn_like(param) * std)
    model.save_pretrained(out)
    (out / "args.json").write_text(json.dumps({"model": str(base_dir), "train_type": "lora"}) + "\n")
    return out


@pytest.fixture(scope="module")
def adapter(default_model, tmp_path_factory) -> pathlib.Path:
    return make_adapter(default_model, tmp_path_factory.mktemp("run") / "checkpoint-3")


@pytest.fixture(scope="module")
def merged(adapter) -> pathlib.Path:
    assert tuneforge(["export", "--adapters", str(adapter), "--merge_lora", "true"]) == 0
    return pathlib.Path(f"{adapter}-merged")


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits  # [1, seq, vocab]


def test_merged_logits_equal_base_plus_adapter(default_model, adapter, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    input_ids = AutoTokenizer.from_pretrained(merged)(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    base_logits = logits_of(base, input_ids)
    adapted = logits_of(PeftModel.from_pretrained(base, adapter).eval(), input_ids)
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(merged).eval(), input_ids)
    # the adapter must matter, or equality below would prove nothing
    assert (adapted - base_logits).abs().max() > 0.1
    assert (merged_logits - adapted).abs().max() < 1e-4


def test_modules_to_save_are_merged_too(default_model, tmp_path):
    """Adapters with modules_to_save are not servable by vLLM as LoRA; export is how they
    are served. The default model ties embed_tokens to lm_head: the trained copy must win."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(default_model, tmp_path / "a", modules_to_save=["embed_tokens"])
    assert tuneforge(["export", "--adapters", str(adapter), "--merge_lora", "true"]) == 0
    input_ids = torch.tensor([[5, 60, 700, 8, 9, 1000]])
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    base_logits = logits_of(base, input_ids)
    adapted = logits_of(PeftModel.from_pretrained(base, adapter).eval(), input_ids)
    merged_logits = logits_of(AutoModelForCausalLM.from_pretrained(f"{adapter}-merged").eval(), input_ids)
    assert (adapted - base_logits).abs().max() > 0.1
    assert (merged_logits - adapted).abs().max() < 1e-4


def test_merged_directory_is_a_complete_published_model(default_model, adapter, merged):
    from transformers import AutoConfig, AutoTokenizer

    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "args.json", "manifest.json"} <= names
    assert not any("adapter" in name for name in names)  # a plain model, not a PEFT directory
    assert not list(merged.parent.glob(".tmp-*"))
    manifest = checkpoint.verify(merged)
    assert set(manifest["files"]) == names - {"manifest.json"}
    args = json.loads((merged / "args.json").read_text())
    assert args["model"] == str(default_model) and args["adapters"] == [str(adapter)]
    assert args["adapter_args"]["train_type"] == "lora" and args["versions"]["peft"]
    assert AutoConfig.from_pretrained(merged).dtype == torch.float32
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        AutoTokenizer.from_pretrained(default_model).apply_chat_template([{"role": "user", "content": "hi"}],
                                                                          tokenize=False)


def test_run_directory_output_dir_and_dtype(adapter, tmp_path):
    out = tmp_path / "bf16"
    # a run directory resolves to its newest checkpoint, as deploy does
    assert tuneforge(["export", "--adapters", str(adapter.parent), "--merge_lora", "true",
                      "--output_dir", str(out), "--torch_dtype", "bfloat16"]) == 0
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    assert json.loads((out / "args.json").read_text())["adapters"] == [str(adapter)]


def run_error(argv: list[str], capsys) -> str:
    capsys.readouterr()  # drop what set-up printed (transformers' progress bars)
    assert tuneforge(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # one error line, last (a progress bar drawn before the problem showed is erased: \r)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_mistakes_are_one_line_exit_2(adapter, merged, tmp_path, capsys):
    # merged exists by now: the default output is taken
    err = run_error(["--adapters", str(adapter), "--merge_lora", "true"], capsys)
    assert "already exists" in err and "output_dir" in err
    err = run_error(["--adapters", str(tmp_path), "--merge_lora", "true", "--output_dir", str(tmp_path / "o")], capsys)
    assert "neither a LoRA adapter directory nor a run directory" in err
    err = run_error(["--adapters", str(adapter), "--output_dir", str(tmp_path / "o")], capsys)
    assert "merge_lora" in err
    assert not (tmp_path / "o").exists()


def test_base_mismatch_is_one_line_exit_2(adapter, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    LlamaForCausalLM(LlamaConfig(vocab_size=3072, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=64)).save_pretrained(other)
    out = tmp_path / "o"
    err = run_error(["--adapters", str(adapter), "--merge_lora", "true", "--model", str(other),
                     "--output_dir", str(out)], capsys)
    assert "shapes differ" in err and "hidden_size 256 != 128" in err
    # the recorded base is gone: the adapter's own shapes are checked against the given base
    copy = tmp_path / "copy"
    make_adapter(other, copy)
    (copy / "args.json").write_text(json.dumps({"model": str(tmp_path / "deleted")}))
    from libs.default_model.resolve import resolve_model

    err = run_error(["--adapters", str(copy), "--merge_lora", "true", "--model", str(resolve_model(None)),
                     "--output_dir", str(out)], capsys)
    assert "does not fit base model" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


VLLM_GREEDY = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if __name__ == "__main__":
        model, ids = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        print("TOKENS=" + json.dumps(list(out[0].outputs[0].token_ids)))
""")


@pytest.mark.slow
def test_vllm_serves_the_merged_model_like_base_plus_adapter(default_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # B ~ N(0, 0.2) changes the greedy continuation; its smallest top-1/top-2 logit gap along
    # the way is about 0.1, far above float32 noise, so equal tokens are a fair test
    adapter = make_adapter(default_model, tmp_path / "checkpoint-1", std=0.2)
    merged = tmp_path / "merged"
    assert tuneforge(["export", "--adapters", str(adapter), "--merge_lora", "true", "--output_dir", str(merged)]) == 0

    ids = AutoTokenizer.from_pretrained(merged)(PROMPT).input_ids
    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])

    def greedy(model) -> list[int]:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 attention_mask=torch.ones_like(prompt))
        return out[0, len(ids):].tolist()

    base_tokens = greedy(base)
    adapter_tokens = greedy(PeftModel.from_pretrained(base, adapter).eval())
    assert adapter_tokens != base_tokens
    script = tmp_path / "vllm_greedy.py"
    script.write_text(VLLM_GREEDY)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    done = subprocess.run([sys.executable, str(script), str(merged), json.dumps(ids)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("TOKENS="))
    vllm_tokens = json.loads(line.removeprefix("TOKENS="))
    assert vllm_tokens == adapter_tokens
