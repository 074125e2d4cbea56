"""Tool calling end to end on the session stack (serving runs --tool_call_parser hermes
--enable_auto_tool_choice true), through the official openai client, every answer parsed strictly
with the openai package's typed models:
  - a self-cognition-style LoRA trained in the test to call a tool (rows of a tool-calling dataset in
    messages format with `tools`, prepared by dataprep and trained by the trainer over gRPC),
    hot-loaded by serving: user -> assistant tool call (message.tool_calls, finish_reason tool_calls)
    -> the tool's result -> a final answer, whole and streamed (delta.tool_calls);
  - tool_choice none / required / a named function on the untrained base model: required and named
    are decoded under vLLM's structural tag, so even it answers with a well-formed call."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from cli import demo
from libs.dataset import client as dataprep_client
from protos.tuneforge.trainer.v1 import trainer_pb2 as pb
from services.dataprep.config import PrepareConfig
from services.trainer import client as trainer_client
from services.trainer.config import TrainConfig

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# One city, many phrasings: the tiny default model memorizes the call and the answer as a
# self-cognition adapter memorizes its identity (with four cities it mixed them up at 100 steps).
ASKS = ["What is the weather in Paris?", "How is the weather in Paris today?", "Weather in Paris?",
        "Is it sunny in Paris?", "What's the weather like in Paris?", "Tell me the weather in Paris.",
        "How warm is it in Paris?", "Paris weather, please."]
RESULT, ANSWER = "22 C, sunny", "It is 22 C, sunny in Paris."
NAMED = {"type": "function", "function": {"name": "get_weather"}}
# Measured here (2 shared cores, load 15-30): 80 steps at 1.4-2.8 s each.
STEPS = 80


def rows() -> list[dict]:
    """The dataset: each question answered by a get_weather call, the call's result, then the answer."""
    return [{"tools": TOOLS, "messages": [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT},
        {"role": "assistant", "content": ANSWER}]} for ask in ASKS]


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="unused", max_retries=0)


def chat(client, model, stream: bool, **kwargs) -> tuple[str | None, list[dict], str]:
    """(content, tool calls as {id, name, arguments}, finish_reason) of one greedy answer, parsed
    strictly; a stream's chunks are assembled as a client does (calls by index)."""
    kwargs = {"temperature": 0, "max_tokens": 60, "tools": TOOLS, **kwargs}
    if not stream:
        reply = ChatCompletion.model_validate(client.chat.completions.create(model=model, **kwargs).model_dump(),
                                              strict=True)
        (choice,) = reply.choices
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                 for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = "", {}, None
    for raw in client.chat.completions.create(model=model, stream=True, **kwargs):
        chunk = ChatCompletionChunk.model_validate(raw.model_dump(), strict=True)
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": None, "name": "", "arguments": ""})
                if piece.id is not None:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = piece.id
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


@pytest.fixture(scope="module")
def tool_adapter(stack, tmp_path_factory) -> str:
    """The adapter, trained here and hot-loaded by serving from the trainer's publication."""
    root = tmp_path_factory.mktemp("tool-adapter")
    model = str(stack.model_dir)
    (root / "tools.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows()))
    started = time.monotonic()
    manifest = dataprep_client.prepare(stack.dataprep, PrepareConfig(
        model=model, dataset=[str(root / "tools.jsonl")], output_dir=str(root / "prepared")))
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (len(rows()), 0)
    job = trainer_client.wait(stack.trainer, trainer_client.submit(stack.trainer, TrainConfig(
        model=model, dataset=str(root / "prepared"), dataprep_address=stack.dataprep, output_dir=str(root / "run"),
        adapter_name="weather-tools", max_steps=STEPS, learning_rate=5e-3, lora_rank=16, lora_alpha=32,
        lora_dropout=0.0, lr_scheduler_type="constant", per_device_train_batch_size=4, save_steps=1000)))
    assert job.state == pb.JOB_STATE_SUCCEEDED
    client = openai.OpenAI(base_url=f"{stack.serving_http}/v1", api_key="unused")
    demo.wait_for_adapter(client, "weather-tools", timeout=60)
    print(f"tool adapter prepared, trained ({STEPS} steps) and served in {time.monotonic() - started:.0f} s")
    return "weather-tools"


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_trained_adapter_calls_the_tool_and_answers_from_its_result(client, tool_adapter, stream):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    content, calls, finish = chat(client, tool_adapter, stream, messages=question)
    assert (content, finish) == (None, "tool_calls")
    (call,) = calls
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris"})
    assert call["id"].startswith("chatcmpl-tool-")

    # the conversation goes on as an application writes it: the assistant's call, the tool's result
    conversation = [*question,
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call["id"], "type": "function",
                         "function": {"name": call["name"], "arguments": call["arguments"]}}]},
                    {"role": "tool", "tool_call_id": call["id"], "content": RESULT}]
    content, calls, finish = chat(client, tool_adapter, stream, messages=conversation)
    assert (content, calls, finish) == (ANSWER, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice, finish_reason", [("required", "tool_calls"), (NAMED, "stop")])
def test_required_and_named_tool_choice_make_the_base_model_call(client, stack, stream, tool_choice, finish_reason):
    """The base model was never trained to call (with auto it does not): the structural tag vLLM's
    hermes parser derives from the tools guides it into a well-formed call of the tool."""
    base = client.models.list().data[0].id
    # parallel_tool_calls false: one call, then the grammar ends the answer. The tool is not strict,
    # so only the call's envelope is guided and the arguments are any JSON (with `"strict": true` the
    # untrained model wrote `{` and then whitespace, which JSON allows, until max_tokens).
    content, calls, finish = chat(client, base, stream, tool_choice=tool_choice, max_tokens=120,
                                  parallel_tool_calls=False,
                                  messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert (len(calls), calls[0]["name"] if calls else None, finish) == (1, "get_weather", finish_reason), \
        (content, calls, finish)
    json.loads(calls[0]["arguments"])  # well-formed JSON, whatever the untrained model put in it
    assert calls[0]["id"].startswith("chatcmpl-tool-")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["none", "auto"])
def test_the_untrained_base_model_does_not_call_unless_made_to(client, stream, tool_choice):
    base = client.models.list().data[0].id
    content, calls, finish = chat(client, base, stream, tool_choice=tool_choice, max_tokens=8,
                                  messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert calls == [] and finish in ("stop", "length") and content
