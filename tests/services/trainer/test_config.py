"""TrainConfig: ms-swift flags and defaults, every problem at once, proto round trip."""

import pytest

from libs.common import config as cfg
from libs.common.errors import Problems
from services.trainer.config import TrainConfig, TrainerServerConfig, from_arguments, to_arguments

REQUIRED = ["--dataset", "/data/prepared", "--dataprep_address", "127.0.0.1:5000", "--output_dir", "/tmp/run-x"]


def test_flags_and_defaults():
    config = cfg.parse(TrainConfig, [*REQUIRED, "--lora_rank", "16", "--target_modules", "q_proj", "v_proj",
                                   "--learning_rate", "3e-3", "--num_train_epochs", "2"])
    assert (config.lora_rank, config.target_modules, config.learning_rate, config.num_train_epochs) == \
        (16, ["q_proj", "v_proj"], 3e-3, 2.0)
    defaults = TrainConfig()
    assert (defaults.train_type, defaults.lora_rank, defaults.lora_alpha, defaults.lora_dropout) == ("lora", 8, 32, 0.05)
    assert (defaults.target_modules, defaults.learning_rate, defaults.lr_scheduler_type) == (["all-linear"], 1e-4, "cosine")
    assert (defaults.weight_decay, defaults.max_grad_norm, defaults.max_steps, defaults.save_steps) == (0.1, 1.0, -1, 500)
    assert (defaults.seed, defaults.torch_dtype, defaults.model) == (42, "float32", None)
    assert defaults.dataset_shuffle is True  # ms-swift's default: every epoch in its own order


def test_dataset_shuffle_crosses_the_wire_either_way():
    """An unset optional bool is the dataclass default (true); false must survive as false."""
    for flags, shuffle in (([], True), (["--dataset_shuffle", "false"], False), (["--dataset_shuffle", "true"], True)):
        config = cfg.parse(TrainConfig, [*REQUIRED, *flags])
        assert config.dataset_shuffle is shuffle
        assert from_arguments(to_arguments(config)).dataset_shuffle is shuffle
    from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
    unset = pb.TrainingArguments(dataset="/data/prepared", dataprep_address="127.0.0.1:5000", output_dir="/tmp/run-x")
    assert from_arguments(unset).dataset_shuffle is True


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(Problems) as caught:
        cfg.parse(TrainConfig, ["--train_type", "qlor", "--lora_rank", "0", "--lr_scheduler_type", "cosin",
                              "--max_steps", "0", "--model", str(tmp_path / "missing"), "--torch_dtype", "fp8"])
    problems = caught.value.problems
    assert problems[0] == "train_type: expected one of lora, qlora, full; got 'qlor'"
    for field in ("dataset: required", "dataprep_address: required", "output_dir: required",
                  "lora_rank: must be positive", "lr_scheduler_type: expected one of cosine, linear, constant",
                  "max_steps: must be positive", "model: model directory", "torch_dtype: expected one of"):
        assert any(p.startswith(field) for p in problems), (field, problems)


def test_flags_that_do_not_go_with_the_train_type_are_all_named():
    with pytest.raises(Problems) as caught:
        cfg.parse(TrainConfig, [*REQUIRED, "--train_type", "full", "--quant_bits", "4", "--modules_to_save", "lm_head",
                              "--save_total_limit", "0", "--split_dataset_ratio", "0.1", "--val_dataset", "v"])
    assert caught.value.problems == [
        "quant_bits: 4-bit weights cannot be fully fine-tuned; use --train_type qlora",
        "modules_to_save: only for lora and qlora (full trains every module)",
        "save_total_limit: must be at least 1 (unset keeps all); got 0",
        "split_dataset_ratio: give either split_dataset_ratio or val_dataset, not both",
    ]
    with pytest.raises(Problems, match="quant_bits: only 4"):
        cfg.parse(TrainConfig, [*REQUIRED, "--train_type", "qlora", "--quant_bits", "8"])
    qlora = cfg.parse(TrainConfig, [*REQUIRED, "--train_type", "qlora", "--modules_to_save", "lm_head"])
    assert qlora.is_adapter and qlora.modules_to_save == ["lm_head"]


def test_unknown_flag_gets_a_hint():
    with pytest.raises(Problems, match="did you mean 'lora_rank'"):
        cfg.parse(TrainConfig, [*REQUIRED, "--lora_rnak", "4"])


def test_an_output_dir_with_checkpoints_is_refused(tmp_path):
    (tmp_path / "checkpoint-10").mkdir()
    with pytest.raises(Problems, match="already holds checkpoints"):
        cfg.parse(TrainConfig, [*REQUIRED[:4], "--output_dir", str(tmp_path)])


def test_proto_round_trip_keeps_decimal_values():
    config = cfg.parse(TrainConfig, [*REQUIRED, "--learning_rate", "1e-4", "--lora_dropout", "0.1",
                                   "--model_name", "Ada", "--max_steps", "7", "--train_type", "qlora",
                                   "--modules_to_save", "lm_head", "--gradient_checkpointing", "true",
                                   "--save_total_limit", "2", "--eval_steps", "3", "--split_dataset_ratio", "0.25"])
    message = to_arguments(config)
    assert message.learning_rate != 1e-4  # float32 on the wire
    back = from_arguments(message)
    assert back == config  # ... and 1e-4 again in the job's arguments


def test_adapter_name_defaults_to_the_run_directory_name():
    assert cfg.parse(TrainConfig, REQUIRED).resolved_adapter_name() == "run-x"
    assert cfg.parse(TrainConfig, [*REQUIRED, "--adapter_name", "ada"]).resolved_adapter_name() == "ada"


def test_server_config():
    config = cfg.parse(TrainerServerConfig, ["--port", "0", "--max_concurrent_jobs", "2"])
    assert (config.max_concurrent_jobs, config.cancel_timeout, config.host) == (2, 60.0, "127.0.0.1")
    with pytest.raises(Problems, match="max_concurrent_jobs"):
        cfg.parse(TrainerServerConfig, ["--max_concurrent_jobs", "0"])
    assert (config.max_streams, config.unary_threads) == (64, 16)
    with pytest.raises(Problems) as caught:
        cfg.parse(TrainerServerConfig, ["--max_streams", "0", "--max_concurrent_jobs", "0"])
    assert caught.value.problems == ["max_streams: expected a positive number; got 0",
                                     "max_concurrent_jobs: must be at least 1; got 0"]


def test_module_names_the_model_lacks_are_found_before_any_work():
    with pytest.raises(Problems) as caught:
        cfg.parse(TrainConfig, [*REQUIRED, "--target_modules", "q_proj", "qq_proj", "--modules_to_save", "lm_hed"])
    assert caught.value.problems == ["target_modules: the model has no module named qq_proj",
                                     "modules_to_save: the model has no module named lm_hed"]
    config = cfg.parse(TrainConfig, [*REQUIRED, "--target_modules", "q_proj", "v_proj", "--modules_to_save", "lm_head"])
    assert config.target_modules == ["q_proj", "v_proj"]
