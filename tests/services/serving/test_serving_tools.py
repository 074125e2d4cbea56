"""Tool calling with vLLM's parsers (services/serving/api/chat_completions/tools.py) on the default
model's real tokenizer and vLLM's real hermes parser, no engine: the --tool_call_parser check, the
decoding constraint tool_choice puts on a request, whole answers and streamed deltas parsed into
OpenAI tool calls, and the finish_reason rule."""

from __future__ import annotations

import json

import pytest

from libs.common.errors import InvalidArgument

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer(default_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def calling(tokenizer):
    from services.serving.api.chat_completions.tools import ToolCalling

    return ToolCalling(tokenizer, "hermes", "default")


def request(tool_choice, tools=TOOLS):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                                 "tools": tools, "tool_choice": tool_choice})


def test_an_unknown_parser_is_refused_naming_the_flag_and_the_choices(tokenizer):
    from services.serving.api.chat_completions.tools import ToolCalling

    with pytest.raises(InvalidArgument) as info:
        ToolCalling(tokenizer, "hermez", "default")
    assert info.value.field == "tool_call_parser"
    assert info.value.message.startswith("unknown tool parser 'hermez'; vLLM has ")
    assert {"hermes", "llama3_json", "mistral", "pythonic"} <= set(info.value.message.split("vLLM has ")[1].split(", "))


@pytest.mark.parametrize("tool_choice, finish_reason", [("auto", "tool_calls"), ("required", "tool_calls"),
                                                        (NAMED, "stop")])
def test_a_whole_answer_is_parsed_into_openai_tool_calls(calling, tokenizer, tool_choice, finish_reason):
    """OpenAI's rule: "tool_calls" when the model called by choice (auto) or had to (required), "stop"
    for a named function; the text before the call stays content."""
    text = "Let me check." + CALL
    parsed = calling.parse(request(tool_choice), text, tokenizer(text, add_special_tokens=False)["input_ids"], "stop")
    assert parsed.content == "Let me check."
    assert [({**call, "id": "x"}) for call in parsed.tool_calls] == [
        {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert parsed.tool_calls[0]["id"].startswith("chatcmpl-tool-")
    assert parsed.finish_reason == finish_reason


@pytest.mark.parametrize("tool_choice, tools", [("auto", TOOLS), ("none", TOOLS), (None, None)])
def test_text_is_content_when_no_call_is_parsed_or_none_is_asked(calling, tokenizer, tool_choice, tools):
    text = "It is sunny." if tool_choice == "auto" else "It is sunny." + CALL  # none: a call written is text
    parsed = calling.parse(request(tool_choice, tools), text, tokenizer(text, add_special_tokens=False)["input_ids"],
                           "stop")
    assert (parsed.content, parsed.tool_calls, parsed.finish_reason) == (text, [], "stop")
    assert calling.parse(request(tool_choice, tools), text, [], "length").finish_reason == "length"


@pytest.mark.parametrize("tool_choice", ["auto", "required", NAMED])
def test_streamed_deltas_assemble_into_the_whole_answers_call(calling, tokenizer, tool_choice):
    """Token by token as the engine streams them: the content before the call, then the call's id,
    type and name once, then its arguments in pieces that join into the whole answer's."""
    text = "Let me check." + CALL
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = calling.stream(request(tool_choice), [1, 2])
    deltas = [stream.delta(tokenizer.decode([token]), [token], "stop" if i == len(ids) - 1 else None)
              for i, token in enumerate(ids)]
    content = "".join(c for c, _ in deltas if c)
    calls = [call for _, part in deltas for call in part]
    assert content == "Let me check."
    assert {**calls[0], "id": "x"} == {"id": "x", "type": "function", "index": 0, "function": {"name": "get_weather"}}
    assert all(call.keys() == {"index", "function"} and call["function"].keys() == {"arguments"} for call in calls[1:])
    assert json.loads("".join(call["function"]["arguments"] for call in calls[1:])) == {"city": "Paris"}
    assert stream.finish_reason("stop") == ("stop" if tool_choice == NAMED else "tool_calls")


def test_required_and_named_are_decoded_under_vllms_structural_tag(calling):
    """What makes even an untrained model answer with a well-formed call: the hermes call
    envelope, arguments constrained by the tool's JSON schema; one call for a named function."""
    for tool_choice, one_call in (("required", False), (NAMED, True)):
        constraint = calling.adjust(request(tool_choice)).structured_outputs
        tag = json.loads(constraint.structural_tag)["format"]
        assert (tag["type"], tag["at_least_one"], tag["stop_after_first"]) == ("tags_with_separator", True, one_call)
        assert tag["tags"][0]["begin"] == '<tool_call>\n{"name": "get_weather", "arguments": '
        assert tag["tags"][0]["end"] == "}\n</tool_call>"
    for tool_choice in ("auto", "none"):
        assert calling.adjust(request(tool_choice)).structured_outputs is None


@pytest.mark.parametrize("parser, auto, tool_choice, message", [
    (None, False, None, 'tool_choice="auto" requires the server to be started with --enable_auto_tool_choice'),
    (None, False, "auto", 'tool_choice="auto" requires the server to be started with --enable_auto_tool_choice'),
    (None, False, "required", 'tool_choice="required" requires the server to be started with --tool_call_parser'),
    (None, False, NAMED, 'tool_choice=function "get_weather" requires the server to be started with --tool_call_parser'),
    ("hermes", False, None, '"auto" tool choice requires --enable_auto_tool_choice and --tool_call_parser'),
])
def test_a_tool_choice_the_servers_flags_do_not_allow_is_invalid_argument(parser, auto, tool_choice, message):
    """vLLM's rules for `vllm serve --tool-call-parser --enable-auto-tool-choice`, by our flag names."""
    from types import SimpleNamespace

    from services.serving.api.chat_completions.handler import check_tool_choice
    from services.serving.api.chat_completions.schema import ChatCompletionRequest

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    request = ChatCompletionRequest.model_validate_json(json.dumps(body))
    with pytest.raises(InvalidArgument) as info:
        check_tool_choice(request, SimpleNamespace(tool_call_parser=parser, enable_auto_tool_choice=auto))
    assert info.value.field == "tool_choice"
    assert info.value.message.startswith(message)
    check_tool_choice(request.model_copy(update={"tool_choice": "none"}),
                      SimpleNamespace(tool_call_parser=None, enable_auto_tool_choice=False))
