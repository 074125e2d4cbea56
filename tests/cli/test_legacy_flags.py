"""ms-swift 1.x's flag names (libs.common.legacy_flags) on the real commands: a command line
from those docs runs after renaming the program, each alias announced in one line; an alias
and its new name disagreeing is an error naming both."""

import json
import shlex

import pytest

from cli import train as cli
from cli.main import main as tuneforge
from libs.common import config as cfg
from libs.common.errors import Problems
from services.serving.infer import InferConfig
from services.trainer.export import ExportConfig

# ms-swift 1.x's README/sft.sh example (qwen-7b-chat LoRA on blossom-math-zh), adapted only
# where this machine differs: the default model (no --model_type/--template_type), a local
# dataset, fp32 on the CPU, and flags TuneForge has no counterpart for dropped
# (--check_dataset_strategy, --use_flash_attn).
SWIFT1_SFT = """swift sft \
    --sft_type lora \
    --dataset {data} \
    --train_dataset_sample 3 \
    --dataset_test_ratio 0.01 \
    --num_train_epochs 1 \
    --max_length 2048 \
    --lora_rank 8 \
    --lora_alpha 32 \
    --lora_dropout_p 0.05 \
    --lora_target_modules ALL \
    --gradient_checkpointing true \
    --batch_size 1 \
    --weight_decay 0.1 \
    --learning_rate 1e-4 \
    --gradient_accumulation_steps 16 \
    --max_grad_norm 0.5 \
    --warmup_ratio 0.03 \
    --eval_steps 100 \
    --save_steps 100 \
    --save_total_limit 2 \
    --logging_steps 10 \
    --dtype fp32 \
    --output_dir {output}"""


def ported(tmp_path) -> list[str]:
    data = tmp_path / "blossom-math-zh.jsonl"
    data.write_text("".join(json.dumps({"query": f"{a}+{a}=?", "response": str(2 * a)}) + "\n" for a in range(5)))
    argv = shlex.split(SWIFT1_SFT.format(data=data, output=tmp_path / "output"))
    assert argv[:2] == ["swift", "sft"]
    return argv[2:]  # `tuneforge sft` takes the rest unchanged


def test_a_swift1_sft_command_line_resolves_to_todays_names(tmp_path, capsys):
    config = cfg.parse(cli.SftCommandConfig, ported(tmp_path), prog="tuneforge sft")
    assert config.dataset == [f"{tmp_path / 'blossom-math-zh.jsonl'}#3"]
    assert (config.train_type, config.split_dataset_ratio, config.lora_dropout, config.target_modules) == (
        "lora", 0.01, 0.05, ["all-linear"])
    assert (config.per_device_train_batch_size, config.torch_dtype, config.gradient_accumulation_steps,
            config.max_grad_norm, config.save_total_limit) == (1, "float32", 16, 0.5, 2)
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "tuneforge sft: note: --sft_type is ms-swift 1.x's name for --train_type: read as --train_type lora",
        "tuneforge sft: note: --train_dataset_sample is ms-swift 1.x's; read as --dataset FILE#3 (ms-swift 3's form)",
        "tuneforge sft: note: --dataset_test_ratio is ms-swift 1.x's name for --split_dataset_ratio: read as "
        "--split_dataset_ratio 0.01",
        "tuneforge sft: note: --lora_dropout_p is ms-swift 1.x's name for --lora_dropout: read as --lora_dropout 0.05",
        "tuneforge sft: note: --lora_target_modules is ms-swift 1.x's name for --target_modules: read as "
        "--target_modules all-linear",
        "tuneforge sft: note: --batch_size is ms-swift 1.x's name for --per_device_train_batch_size: read as "
        "--per_device_train_batch_size 1",
        "tuneforge sft: note: --dtype is ms-swift 1.x's name for --torch_dtype: read as --torch_dtype float32",
    ]


@pytest.mark.slow
def test_the_ported_command_trains_on_the_sampled_rows(tmp_path, capsys):
    # 3 of the 5 rows drawn (dataprep's FILE#N, seeded), 1 of them held out by the 0.01 ratio (ceil(3 x 0.01))
    code = tuneforge(["sft", *ported(tmp_path), "--max_steps", "1", "--lora_rank", "4"])
    err = capsys.readouterr().err
    assert code == 0, err
    manifest = json.loads((tmp_path / "output" / cli.PREPARED_SUBDIR / "manifest.json").read_text())
    assert manifest["rows_in"] == 3
    assert "eval_loss" in err and "over 1 rows" in err


def test_alias_and_new_name_disagreeing_is_an_error_naming_both(tmp_path, capsys):
    argv = ported(tmp_path) + ["--train_type", "full", "--per_device_train_batch_size", "1"]
    code = tuneforge(["sft", *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert errors == ["tuneforge sft: error: --sft_type lora and --train_type full disagree (--sft_type is "
                      "ms-swift 1.x's name for --train_type); give one"]
    assert code == 2


def test_swift1_qlora_and_values_without_a_counterpart(tmp_path, capsys):
    base = ["--dataset", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "o")]
    (tmp_path / "d.jsonl").write_text("{}\n")
    config = cfg.parse(cli.SftCommandConfig, base + ["--sft_type", "lora", "--quantization_bit", "4"])
    assert (config.train_type, config.quant_bits) == ("qlora", 4)  # 1.x's QLoRA
    config = cfg.parse(cli.SftCommandConfig, base + ["--quantization_bit", "0", "--dtype", "AUTO"])
    assert (config.train_type, config.quant_bits, config.torch_dtype) == ("lora", None, "float32")
    config = cfg.parse(cli.SftCommandConfig, base + ["--lora_target_modules", "q_proj", "v_proj",
                                                     "--deepspeed_config_path", "zero2"])
    assert (config.target_modules, config.deepspeed) == (["q_proj", "v_proj"], "zero2")
    with pytest.raises(Problems) as caught:
        cfg.parse(cli.SftCommandConfig, base + ["--lora_target_modules", "DEFAULT", "--dtype", "int8",
                                                "--train_dataset_sample", "0"])
    assert caught.value.problems == [
        "--lora_target_modules (ms-swift 1.x's name for --target_modules): DEFAULT chose modules per model type "
        "in ms-swift 1.x; give ALL (all-linear) or the module names (e.g. q_proj k_proj v_proj)",
        "--dtype (ms-swift 1.x's name for --torch_dtype): expected one of bf16, fp16, fp32 or AUTO; got int8",
        "--train_dataset_sample (ms-swift 1.x's: N rows of --dataset): expected at least 1 row, or -1 for all; got 0",
    ]
    with pytest.raises(Problems, match="--train_dataset_sample: samples one dataset; got --dataset a b"):
        cfg.parse(cli.SftCommandConfig, ["--dataset", "a", "b", "--train_dataset_sample", "2"])
    capsys.readouterr()


def test_ckpt_dir_and_merge_lora_and_save_on_export_and_infer(tmp_path, capsys):
    config = cfg.parse(ExportConfig, ["--ckpt_dir", "run/checkpoint-3", "--merge_lora_and_save", "true"])
    assert (config.adapters, config.merge_lora) == (["run/checkpoint-3"], True)
    config = cfg.parse(InferConfig, ["--ckpt_dir", "run/checkpoint-3", "--val_dataset", "v.jsonl"])
    assert config.adapters == ["run/checkpoint-3"]
    # infer has no merge step: the 1.x flag is unknown there, not silently dropped
    with pytest.raises(Problems, match="unknown flag --merge_lora_and_save"):
        cfg.parse(InferConfig, ["--ckpt_dir", "a", "--val_dataset", "v.jsonl", "--merge_lora_and_save", "true"])
    assert "--ckpt_dir is ms-swift 1.x's name for --adapters: read as --adapters run/checkpoint-3" in (
        capsys.readouterr().err)
