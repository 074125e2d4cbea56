"""Config: flags map onto dataclass fields, every problem is reported at once."""

from dataclasses import dataclass, field

import pytest

from libs.common import config
from libs.common.errors import Problems
from protos.tuneforge.trainer.v1 import trainer_pb2


@dataclass
class Example:
    model: str | None = None
    lora_rank: int = 8
    learning_rate: float = 1e-4
    packing: bool = False
    dataset: list[str] = field(default_factory=list)
    train_type: str = field(default="lora", metadata={"choices": ["lora", "full"]})

    def problems(self):
        return ["lora_rank: must be positive"] if self.lora_rank <= 0 else []


def test_flags_parse_with_ms_swift_spelling():
    parsed = config.parse(Example, ["--lora_rank", "16", "--packing", "true", "--dataset", "a.jsonl", "b.jsonl"])
    assert parsed == Example(lora_rank=16, packing=True, dataset=["a.jsonl", "b.jsonl"])


def test_defaults_live_in_the_dataclass():
    assert config.parse(Example, []) == Example()


def test_all_problems_reported_at_once_with_did_you_mean():
    with pytest.raises(Problems) as info:
        config.parse(Example, ["--lora_rnk", "4", "--learning_rate", "fast", "--train_type", "qlora"])
    problems = info.value.problems
    assert any("--lora_rnk" in p and "did you mean 'lora_rank'" in p for p in problems), problems
    assert any(p.startswith("learning_rate:") for p in problems), problems
    assert any("train_type" in p and "qlora" in p for p in problems), problems
    assert len(problems) == 3


def test_cross_field_problems_come_from_the_dataclass():
    with pytest.raises(Problems, match="lora_rank: must be positive"):
        config.parse(Example, ["--lora_rank", "0"])


def test_bad_bool_is_named():
    with pytest.raises(Problems, match="packing: expected true or false"):
        config.parse(Example, ["--packing", "maybe"])


def test_from_dict_unknown_key_names_the_source():
    with pytest.raises(Problems, match=r"^args.json: unknown argument 'lr'$"):
        config.from_dict(Example, {"lr": 1}, where="args.json")


def test_proto_round_trip_keeps_unset_fields_at_defaults():
    message = trainer_pb2.TrainingArguments(model="m", lora_rank=4, target_modules=["q_proj"])
    converted = config.from_proto(_TrainingSubset, message)
    assert converted == _TrainingSubset(model="m", lora_rank=4, target_modules=["q_proj"])
    back = config.to_proto(converted, trainer_pb2.TrainingArguments)
    assert back.lora_rank == 4 and back.HasField("learning_rate") and back.learning_rate == pytest.approx(1e-4)


@dataclass
class _TrainingSubset:
    model: str | None = None
    lora_rank: int = 8
    learning_rate: float = 1e-4
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
