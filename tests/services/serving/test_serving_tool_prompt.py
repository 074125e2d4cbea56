"""dataprep trains on exactly the prompt serving gives the model for a tool-calling conversation:
a row prepared by the real pipeline (Arrow shards) holds, token for token, the ids serving
renders from the same conversation sent as an OpenAI request (tools, an assistant tool call with
its arguments as JSON text, a tool result with its tool_call_id), and its trained tokens start
exactly where serving asks the model to write."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from libs.dataset.schema import IGNORE_INDEX
from services.dataprep.config import PrepareConfig
from services.dataprep.pipeline import prepare
from services.serving.api.chat_completions.schema import ChatCompletionRequest
from services.serving.engine import render_chat

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MESSAGES = [
    {"role": "user", "content": "What is the weather in Paris?"},
    # compact JSON text, as some clients send it: both sides must render the parsed arguments
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "assistant", "content": "It is 22 C and sunny in Paris."},
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, default_model):
    """The row as the dataprep pipeline writes it: (input_ids, labels)."""
    root = tmp_path_factory.mktemp("tool-row")
    (root / "tools.jsonl").write_text(json.dumps({"tools": TOOLS, "messages": MESSAGES}) + "\n")
    manifest = prepare(PrepareConfig(model=str(default_model), dataset=[str(root / "tools.jsonl")],
                                     output_dir=str(root / "out")))
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (1, 0)
    (shard,) = manifest["shards"]
    (row,) = pa.ipc.open_file(pa.memory_map(str(root / "out" / shard["file"]))).read_all().to_pylist()
    return row["input_ids"], row["labels"]


def served(tokenizer, default_model, messages, add_generation_prompt=True) -> list[int]:
    """The prompt serving renders for an OpenAI chat request with these messages and TOOLS."""
    request = ChatCompletionRequest.model_validate_json(json.dumps({"model": "m", "messages": messages,
                                                                    "tools": TOOLS}))
    return render_chat(tokenizer, [m.for_template() for m in request.messages], default_model,
                       [tool.for_template() for tool in request.tools], add_generation_prompt)


def test_a_prepared_tool_row_is_the_served_prompt_token_for_token(prepared, tokenizer, default_model):
    input_ids, labels = prepared
    assert input_ids == served(tokenizer, default_model, MESSAGES, add_generation_prompt=False)
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # each answer trains from where serving's prompt ends through its <|im_end|> (not the newline after it)
    call_start = len(served(tokenizer, default_model, MESSAGES[:1]))
    call_end = len(served(tokenizer, default_model, MESSAGES[:2], add_generation_prompt=False)) - 1
    answer_start = len(served(tokenizer, default_model, MESSAGES[:3]))
    assert trained == [*range(call_start, call_end), *range(answer_start, len(input_ids) - 1)]
    assert all(labels[i] == input_ids[i] for i in trained)
    assert tokenizer.decode(input_ids[call_start:call_end]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    assert tokenizer.decode(input_ids[answer_start:-1]) == "It is 22 C and sunny in Paris.<|im_end|>"
