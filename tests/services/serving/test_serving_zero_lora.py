"""The zero adapter base-model requests run with on CPU: a valid PEFT adapter on the
served model whose output is exactly the base model's."""

from __future__ import annotations

import json

import torch


def test_zero_adapter_is_a_peft_adapter_that_leaves_the_base_output_unchanged(default_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from services.serving import zero_lora

    path = zero_lora.write(default_model, tmp_path / "zero")
    config = json.loads((path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LORA", 1, ["q_proj"])

    base = AutoModelForCausalLM.from_pretrained(default_model, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, path)
        assert any("lora_A" in name for name, _ in adapted.named_parameters())  # the adapter did attach
        assert torch.equal(adapted(input_ids=ids).logits, expected)


def test_no_adaptable_module_means_no_adapter(tmp_path):
    from safetensors.torch import save_file

    from services.serving import zero_lora

    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"))
    assert zero_lora.write(tmp_path, tmp_path / "zero") is None


def test_no_room_for_the_zero_adapter_is_one_clear_error(default_model, tmp_path):
    """At start, a full temporary directory fails serving with DiskFull (one CLI line), not a
    safetensors traceback: here a 1 kB file-size limit (RLIMIT_FSIZE) on the writing process."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[3]
    pythonpath = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))  # Bazel's packages too
    code = (f"import pathlib\nfrom libs.common.errors import DiskFull\nfrom services.serving import zero_lora\n"
            f"try:\n    zero_lora.write(pathlib.Path('{default_model}'), pathlib.Path('{tmp_path}/zero'))\n"
            f"except DiskFull as exc:\n    print(exc)\n")
    # prlimit, not a preexec_fn: Python code between fork and exec can abort in gRPC's fork handlers
    # (this session's stack runs gRPC threads)
    done = subprocess.run(["prlimit", "--fsize=1024", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=root, env={**os.environ, "PYTHONPATH": pythonpath})
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"no space to write {tmp_path}/zero: File too large (EFBIG); writing the base model's "
                           "zero adapter\n")
