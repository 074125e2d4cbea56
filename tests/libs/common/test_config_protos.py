"""Every config dataclass that travels as a proto message has a proto field for each of its
fields (nested method configs included): a field the proto lacks would be dropped on the wire."""

from __future__ import annotations

import dataclasses

import pytest

from libs.common.config import missing_proto_fields, to_proto
from protos.tuneforge.dataprep.v1 import dataprep_pb2
from protos.tuneforge.trainer.v1 import trainer_pb2
from services.dataprep.config import PrepareConfig
from services.trainer import config as trainer_config

PAIRS = [
    (PrepareConfig, dataprep_pb2.PrepareArguments),
    (trainer_config.TrainConfig, trainer_pb2.TrainingArguments),
    (trainer_config.DpoConfig, trainer_pb2.DpoArguments),
    (trainer_config.KtoConfig, trainer_pb2.KtoArguments),
    (trainer_config.OrpoConfig, trainer_pb2.OrpoArguments),
    (trainer_config.CpoConfig, trainer_pb2.CpoArguments),
    (trainer_config.SimpoConfig, trainer_pb2.SimpoArguments),
    (trainer_config.RewardConfig, trainer_pb2.RewardArguments),
    (trainer_config.GrpoConfig, trainer_pb2.GrpoArguments),
]


@pytest.mark.parametrize("cls, message", PAIRS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_field_has_a_proto_field(cls, message):
    assert missing_proto_fields(cls, message) == []


def test_every_method_config_is_carried_by_training_arguments():
    carried = {name for name, _cls in trainer_config.METHOD_CONFIGS.values()}
    assert carried == set(trainer_config.RLHF_TYPES)
    for name, cls in trainer_config.METHOD_CONFIGS.values():
        assert trainer_pb2.TrainingArguments.DESCRIPTOR.fields_by_name[name].message_type.name == \
            type(to_proto(cls(), getattr(trainer_pb2, f"{cls.__name__.removesuffix('Config')}Arguments"))).__name__


def test_a_field_the_proto_lacks_fails_loudly():
    @dataclasses.dataclass
    class Grown(trainer_config.OrpoConfig):
        new_flag: int = 3

    assert missing_proto_fields(Grown, trainer_pb2.OrpoArguments) == ["new_flag"]
    with pytest.raises(TypeError, match="new_flag"):
        to_proto(Grown(), trainer_pb2.OrpoArguments)


def test_nested_method_arguments_round_trip():
    config = trainer_config.TrainConfig(
        dataset="/d", dataprep_address="127.0.0.1:1", output_dir="/o", rlhf_type="dpo", learning_rate=5e-7,
        dpo=trainer_config.DpoConfig(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2], rpo_alpha=1.0))
    back = trainer_config.from_arguments(trainer_config.to_arguments(config))
    assert back.dpo == config.dpo and back.rlhf_type == "dpo" and back.learning_rate == 5e-7
    # the method named by rlhf_type always has its arguments: its defaults when none were sent
    simpo = trainer_config.TrainConfig(dataset="/d", dataprep_address="127.0.0.1:1", output_dir="/o",
                                       rlhf_type="simpo")
    assert trainer_config.from_arguments(trainer_config.to_arguments(simpo)).simpo == trainer_config.SimpoConfig(
        beta=2.0, simpo_gamma=1.0, cpo_alpha=1.0, label_smoothing=0.0)


def test_grpo_arguments_and_the_generation_fields_round_trip(tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text("def mine(completions, **kwargs):\n    return [0.0 for _ in completions]\n")
    config = trainer_config.TrainConfig(
        dataset="/d", dataprep_address="127.0.0.1:1", output_dir="/o", rlhf_type="grpo", use_vllm=True,
        vllm_mode="server", vllm_server_host="10.0.0.2", vllm_server_port=50051, per_device_train_batch_size=4,
        grpo=trainer_config.GrpoConfig(num_generations=4, temperature=0.7, top_k=-1, reward_funcs=["format", "mine"],
                                       reward_weights=[0.5, 2.0], external_plugins=[str(plugin)], loss_type="dapo",
                                       epsilon_high=0.28, beta=0.0, scale_rewards="batch", soft_cache_length=64))
    back = trainer_config.from_arguments(trainer_config.to_arguments(config))
    assert back.grpo == config.grpo
    assert (back.use_vllm, back.vllm_mode, back.vllm_server_host, back.vllm_server_port) == (
        True, "server", "10.0.0.2", 50051)
    # unset: ms-swift's defaults (beta 0.04 arrives as 0.04, not float32's 0.03999999910593033)
    grpo = trainer_config.from_arguments(trainer_config.to_arguments(trainer_config.TrainConfig(
        dataset="/d", dataprep_address="127.0.0.1:1", output_dir="/o", rlhf_type="grpo", per_device_train_batch_size=8,
        grpo=trainer_config.GrpoConfig(reward_funcs=["format"])))).grpo
    assert grpo == trainer_config.GrpoConfig(reward_funcs=["format"]) and grpo.beta == 0.04
    assert (grpo.num_generations, grpo.max_completion_length, grpo.temperature, grpo.epsilon) == (8, 512, 0.9, 0.2)
