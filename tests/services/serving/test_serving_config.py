"""DeployConfig: flags, all problems at once, and which base model gets served
(--model; else the adapters' args.json `model`, as ms-swift reads it; else the
embedded default model)."""

from __future__ import annotations

import json
import pathlib

import pytest

from libs.common import checkpoint
from libs.common import config as cfg
from libs.common.errors import NotFound, Problems
from services.serving.config import DeployConfig, parse_adapters, resolve_base_model, served_name


def adapter(path: pathlib.Path, base: str | None, args_model: object = "absent", rank: int = 8) -> pathlib.Path:
    """An adapter directory as PEFT + ms-swift write it (weights are not read here)."""

    def fill(tmp: pathlib.Path) -> None:
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}
        if base is not None:
            config["base_model_name_or_path"] = base
        (tmp / "adapter_config.json").write_text(json.dumps(config))
        (tmp / "adapter_model.safetensors").write_bytes(b"weights")
        if args_model != "absent":
            (tmp / "args.json").write_text(json.dumps({"model": args_model}))

    return checkpoint.publish(path, fill)


def test_defaults_and_ms_swift_flag_names():
    config = cfg.parse(DeployConfig, ["--adapters", "a=/x", "b=/y", "--max_lora_rank", "32", "--max_loras", "2",
                                      "--served_model_name", "base", "--max_model_len", "512"])
    assert config.adapters == ["a=/x", "b=/y"]
    assert (config.max_lora_rank, config.max_loras, config.max_model_len) == (32, 2, 512)
    assert (config.host, config.port, config.grpc_port, config.metrics) == ("127.0.0.1", 8000, 0, True)
    assert parse_adapters(config.adapters) == {"a": "/x", "b": "/y"}


def test_max_lora_rank_must_be_one_vllm_supports():
    with pytest.raises(Problems) as info:
        cfg.parse(DeployConfig, ["--max_lora_rank", "12"])
    assert info.value.problems == ["max_lora_rank: expected one of 1, 8, 16, 32, 64, 128, 256, 320, 512; got 12"]


def test_every_problem_is_reported_at_once():
    with pytest.raises(Problems) as info:
        cfg.parse(DeployConfig, ["--adapters", "nopath", "a=/x", "a=/y", "bad name=/z", "--max_loras", "0",
                                 "--port", "70000"])
    problems = info.value.problems
    assert "adapters: expected NAME=PATH; got 'nopath'" in problems
    assert "adapters: 'a' is given twice" in problems
    assert any(p.startswith("adapters: 'bad name' is not a valid adapter name") for p in problems)
    assert "max_loras: must be at least 1; got 0" in problems

    assert "port: must be in [0, 65535]; got 70000" in problems
    assert len(problems) == 5


def test_cpu_cache_and_adapter_root_are_checked(tmp_path):
    config = cfg.parse(DeployConfig, ["--max_loras", "2", "--max_cpu_loras", "8", "--adapter_root", str(tmp_path)])
    assert (config.grpc_max_streams, config.grpc_unary_threads) == (8, 16)
    assert (config.max_loras, config.max_cpu_loras, config.adapter_root) == (2, 8, str(tmp_path))
    problems = DeployConfig(max_loras=4, max_cpu_loras=2, adapter_root=str(tmp_path / "nope"), grpc_max_streams=0,
                            grpc_unary_threads=0).problems()
    assert problems == ["grpc_max_streams: must be at least 1; got 0", "grpc_unary_threads: must be at least 1; got 0",
                        "max_cpu_loras: must be at least max_loras (4); got 2",
                        f"adapter_root: {tmp_path / 'nope'} is not a directory"]


def test_unknown_flag_gets_a_hint():
    with pytest.raises(Problems) as info:
        cfg.parse(DeployConfig, ["--max_lora_ranks", "8"])
    assert info.value.problems == ["unknown flag --max_lora_ranks (did you mean 'max_lora_rank'?)"]


def test_base_model_is_read_from_the_adapters_args_json(default_model, tmp_path):
    first = adapter(tmp_path / "run-a" / "checkpoint-5", base="/elsewhere", args_model=str(default_model))
    second = adapter(tmp_path / "b", base=None, args_model=str(default_model))
    config = DeployConfig(adapters=[f"a={first}", f"b={second}"])
    assert resolve_base_model(config).resolve() == default_model.resolve()
    assert served_name(config, default_model) == default_model.name
    assert served_name(DeployConfig(served_model_name="mine"), default_model) == "mine"


def test_a_run_directory_means_its_newest_checkpoint(default_model, tmp_path):
    adapter(tmp_path / "run" / "checkpoint-2", base=None, args_model="/old/base")
    adapter(tmp_path / "run" / "checkpoint-10", base=None, args_model=str(default_model))
    assert resolve_base_model(DeployConfig(adapters=[f"a={tmp_path / 'run'}"])).resolve() == default_model.resolve()


def test_adapter_config_base_is_used_without_args_json(default_model, tmp_path):
    only_peft = adapter(tmp_path / "peft", base=str(default_model))
    assert resolve_base_model(DeployConfig(adapters=[f"p={only_peft}"])).resolve() == default_model.resolve()


def test_adapters_trained_on_different_bases_are_refused(default_model, tmp_path):
    first = adapter(tmp_path / "a", base=None, args_model=str(default_model))
    second = adapter(tmp_path / "b", base=None, args_model=str(tmp_path))
    with pytest.raises(Problems) as info:
        resolve_base_model(DeployConfig(adapters=[f"a={first}", f"b={second}"]))
    (problem,) = info.value.problems
    assert problem.startswith(f"adapters: b was trained on {tmp_path.resolve()} but a on ")


def test_missing_adapter_and_unknown_base_are_reported_together(tmp_path):
    no_base = adapter(tmp_path / "nobase", base=None)
    with pytest.raises(Problems) as info:
        resolve_base_model(DeployConfig(adapters=[f"gone={tmp_path / 'gone'}", f"nobase={no_base}"]))
    problems = info.value.problems
    assert len(problems) == 2
    assert problems[0] == f"adapters: gone: {tmp_path / 'gone'} does not exist"
    assert problems[1].startswith("adapters: nobase:") and "give --model" in problems[1]


def test_model_flag_wins_and_must_be_a_model_directory(default_model, tmp_path):
    other = adapter(tmp_path / "a", base=None, args_model="/some/other/base")
    config = DeployConfig(model=str(default_model), adapters=[f"a={other}"])
    assert resolve_base_model(config).resolve() == default_model.resolve()
    with pytest.raises(NotFound) as info:
        resolve_base_model(DeployConfig(model=str(tmp_path / "nothing")))
    assert info.value.field == "model"


def test_neither_model_nor_adapters_means_the_default_model(default_model):
    assert resolve_base_model(DeployConfig()).resolve() == default_model.resolve()


def test_an_unknown_tool_parser_is_refused_at_start_listing_vllms_parsers():
    with pytest.raises(Problems) as info:
        cfg.parse(DeployConfig, ["--tool_call_parser", "hermez", "--enable_auto_tool_choice", "true", "--max_loras", "0"])
    loras, parser = info.value.problems
    assert parser.startswith("tool_call_parser: unknown tool parser 'hermez'; vLLM has ")
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(parser.split("vLLM has ")[1].split(", "))
    assert loras == "max_loras: must be at least 1; got 0"
    assert cfg.parse(DeployConfig, ["--tool_call_parser", "hermes"]).tool_call_parser == "hermes"
    with pytest.raises(Problems, match="enable_auto_tool_choice: needs tool_call_parser"):
        cfg.parse(DeployConfig, ["--enable_auto_tool_choice", "true"])


def test_lora_merge_single_is_off_unless_asked_for():
    assert cfg.parse(DeployConfig, []).lora_merge_single is False
    assert cfg.parse(DeployConfig, ["--lora_merge_single", "true"]).lora_merge_single is True
