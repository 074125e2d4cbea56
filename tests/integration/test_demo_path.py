"""The demo path on the session stack: raw data -> dataprep -> (gRPC) -> trainer
-> published checkpoints -> serving hot-loads them -> the official openai client."""

import json
import pathlib

import pytest

from cli import demo
from libs.common import checkpoint


@pytest.mark.slow
def test_two_identities_trained_published_and_served(stack, tmp_path):
    config = demo.DemoConfig()
    endpoints = demo.Endpoints(stack.dataprep, stack.trainer, stack.serving_http)
    result = demo.run_path(endpoints, stack.model_dir, config, tmp_path)

    assert result["failures"] == [], result["answers"]
    assert {"lora1", "lora2", result["base"]} <= set(result["models"])
    for adapter, name, author in zip(["lora1", "lora2"], config.model_name, config.model_author):
        published = checkpoint.checkpoints(tmp_path / adapter)
        assert [checkpoint.step_of(p) for p in published] == [config.save_steps, config.max_steps]
        final = published[-1]
        checkpoint.verify(final)
        for name_ in ("adapter_config.json", "adapter_model.safetensors", "args.json", "logging.jsonl"):
            assert (final / name_).is_file(), name_
        args = json.loads((final / "args.json").read_text())
        assert pathlib.Path(args["model"]).resolve() == pathlib.Path(stack.model_dir).resolve()
        assert (args["model_name"], args["model_author"]) == (name, author)
        logged = [json.loads(line) for line in (final / "logging.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in logged] == list(range(1, config.max_steps + 1))
        assert logged[-1]["loss"] < logged[0]["loss"] / 4
        assert result["load_latency_seconds"][adapter] < 10
