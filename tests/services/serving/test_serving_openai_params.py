"""Every OpenAI/vLLM request parameter the serving API implements, through the official
`openai` client against the session's serving process, whole and streamed, each answer parsed
strictly with the openai package's own typed models: logprobs (consistent with the tokens
returned), sampling extensions (top_k, min_p, logit_bias, min_tokens, ignore_eos,
stop_token_ids, penalties), structured output (validated with jsonschema), tools rendered by
the chat template, batched /v1/completions (the engine sees the prompts together), echo, and
vLLM's /tokenize, /detokenize and /version."""

from __future__ import annotations

import json
import time
import urllib.request

import jsonschema
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "who are you?"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(serving) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# vLLM's parameters the openai client sends in `extra_body`.
VLLM_EXTRAS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids")


def _extras(kwargs: dict) -> dict:
    extra = {key: kwargs.pop(key) for key in VLLM_EXTRAS if key in kwargs}
    return {**kwargs, "extra_body": extra} if extra else kwargs


def _chat(client, model, stream: bool, **kwargs) -> tuple[ChatCompletion | list[ChatCompletionChunk], object]:
    """The answer parsed strictly (whole, or every chunk), and its usage."""
    kwargs = _extras(kwargs)
    if not stream:
        reply = client.chat.completions.create(model=model, messages=kwargs.pop("messages", QUESTION), **kwargs)
        parsed = ChatCompletion.model_validate(reply.model_dump(), strict=True)
        return parsed, parsed.usage
    chunks = [ChatCompletionChunk.model_validate(chunk.model_dump(), strict=True) for chunk in
              client.chat.completions.create(model=model, messages=kwargs.pop("messages", QUESTION), stream=True,
                                             stream_options={"include_usage": True}, **kwargs)]
    return chunks, chunks[-1].usage


def _chat_text_and_logprobs(result) -> tuple[str, list, str | None]:
    if isinstance(result, ChatCompletion):
        (choice,) = result.choices
        return choice.message.content, (choice.logprobs.content if choice.logprobs else []), choice.finish_reason
    text, entries, finish = "", [], None
    for chunk in result:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            entries += choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
            finish = choice.finish_reason or finish
    return text, entries, finish


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_match_the_tokens_returned(client, serving, stream):
    result, usage = _chat(client, serving.base_name, stream, temperature=0, max_tokens=8, logprobs=True,
                          top_logprobs=3)
    text, entries, _ = _chat_text_and_logprobs(result)
    assert len(entries) == usage.completion_tokens > 0
    for entry in entries:
        assert len(entry.top_logprobs) == 3
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob <= 0
        # greedy: the chosen token is the most likely one, with the same logprob
        assert (entry.token, entry.logprob) == (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())
    assert "".join(entry.token for entry in entries) == text


def test_chat_without_logprobs_has_none(client, serving):
    result, _ = _chat(client, serving.base_name, False, max_tokens=2)
    assert result.choices[0].logprobs is None


def _token(serving, text: str) -> tuple[int, str]:
    """A token id of the served model's vocabulary (the first of `text`) and its text."""
    token_id = _post(f"{serving.http}/tokenize", {"prompt": text, "add_special_tokens": False})[1]["tokens"][0]
    return token_id, _post(f"{serving.http}/detokenize", {"tokens": [token_id]})[1]["prompt"]


@pytest.mark.parametrize("stream", [False, True])
def test_ignore_eos_fills_the_budget(client, serving, stream):
    # vLLM's `bench serve` sends ignore_eos with every request.
    result, usage = _chat(client, serving.base_name, stream, temperature=0, max_tokens=12, ignore_eos=True)
    assert usage.completion_tokens == 12
    assert _chat_text_and_logprobs(result)[2] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_forces_a_token(client, serving, stream):
    token_id, text = _token(serving, " yes")
    result, usage = _chat(client, serving.base_name, stream, temperature=0, max_tokens=5, ignore_eos=True,
                          logprobs=True, logit_bias={str(token_id): 100})
    _, entries, _ = _chat_text_and_logprobs(result)
    assert [entry.token for entry in entries] == [text] * 5


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_end_the_answer_and_min_tokens_hold_them_back(client, serving, stream):
    token_id, _ = _token(serving, " yes")
    forced = dict(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={str(token_id): 100},
                  stop_token_ids=[token_id])
    result, usage = _chat(client, serving.base_name, stream, **forced)
    assert (_chat_text_and_logprobs(result)[2], usage.completion_tokens) == ("stop", 1)
    # min_tokens: the stop token cannot come before 4 tokens are out; the 5th is the forced stop
    result, usage = _chat(client, serving.base_name, stream, min_tokens=4, **forced)
    assert (_chat_text_and_logprobs(result)[2], usage.completion_tokens) == ("stop", 5)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("greedy_by", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_sample_greedily(client, serving, stream, greedy_by):
    greedy, _ = _chat(client, serving.base_name, False, temperature=0, max_tokens=8, ignore_eos=True)
    result, _ = _chat(client, serving.base_name, stream, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True,
                      **greedy_by)
    assert _chat_text_and_logprobs(result)[0] == greedy.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
def test_penalties_change_a_greedy_answer(client, serving, stream):
    plain, _ = _chat(client, serving.base_name, False, temperature=0, max_tokens=24, ignore_eos=True)
    result, usage = _chat(client, serving.base_name, stream, temperature=0, max_tokens=24, ignore_eos=True,
                          presence_penalty=2.0, frequency_penalty=2.0, repetition_penalty=1.5)
    assert usage.completion_tokens == 24
    assert _chat_text_and_logprobs(result)[0] != plain.choices[0].message.content


@pytest.fixture(scope="module")
def no_whitespace(serving) -> dict[str, int]:
    """logit_bias banning every whitespace-only token: the tiny default model, held to a JSON
    grammar, would otherwise spend its whole budget on the whitespace JSON allows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(serving.model_dir)
    return {str(i): -100 for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, serving, stream, no_whitespace):
    result, _ = _chat(client, serving.base_name, stream, temperature=0, max_completion_tokens=64,
                      logit_bias=no_whitespace, response_format={
                          "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}})
    text, _, finish = _chat_text_and_logprobs(result)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_output_parses(client, serving, stream, no_whitespace):
    result, _ = _chat(client, serving.base_name, stream, temperature=0, max_tokens=64, logit_bias=no_whitespace,
                      messages=[{"role": "user", "content": "Answer in JSON: who are you?"}],
                      response_format={"type": "json_object"})
    text, _, finish = _chat_text_and_logprobs(result)
    if finish == "stop":
        assert isinstance(json.loads(text), dict), text
    else:  # the budget ran out inside the object (a free-form object may not end): an object's beginning
        assert text.startswith("{"), text


def test_tools_reach_the_chat_template(client, serving):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    with_tools = _post(f"{serving.http}/tokenize", {"messages": QUESTION, "tools": tools})[1]
    without = _post(f"{serving.http}/tokenize", {"messages": QUESTION})[1]
    result, usage = _chat(client, serving.base_name, False, max_tokens=2, tools=tools, tool_choice="none")
    # the default model's template lists the tools in the system turn (as Qwen2.5's does)
    assert usage.prompt_tokens == with_tools["count"] > without["count"]
    assert result.choices[0].message.tool_calls is None


@pytest.mark.parametrize("tool_choice, message", [
    ({"type": "function", "function": {"name": "other"}}, "does not match any of the tools"),
    ("required", "When using `tool_choice`, `tools` must be set."),
])
def test_a_tool_choice_the_tools_do_not_allow_is_a_400_naming_it(serving, tool_choice, message):
    """(What the server's flags refuse: test_serving_tools.py, the session server has a parser.)"""
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    body = {"model": serving.base_name, "messages": QUESTION, "max_tokens": 2, "tool_choice": tool_choice}
    if tool_choice != "required":
        body["tools"] = tools
    status, error = _post(f"{serving.http}/v1/chat/completions", body)
    assert (status, error["error"]["param"]) == (400, "tool_choice"), error
    assert message in error["error"]["message"]


@pytest.mark.parametrize("change, param", [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: vLLM's and OpenAI's refusal
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -2}, "top_k"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
])
def test_bad_parameters_are_400_naming_them(serving, change, param):
    for stream in (False, True):
        body = {"model": serving.base_name, "messages": QUESTION, "max_tokens": 2, "stream": stream, **change}
        status, error = _post(f"{serving.http}/v1/chat/completions", body)
        assert status == 400, error
        assert error["error"]["param"] == param, error


# -- /v1/completions -----------------------------------------------------------------------------

def _completion_chunk(chunk) -> Completion:
    """A streamed text completion chunk, parsed strictly. OpenAI's streams (and vLLM's) carry
    `finish_reason: null` until a choice ends, which the SDK's Completion model cannot express:
    that one field is checked here and the rest strictly by the model."""
    body = chunk.model_dump()
    for choice in body["choices"]:
        assert choice["finish_reason"] in (None, "stop", "length")
        choice["finish_reason"] = choice["finish_reason"] or "length"
    return Completion.model_validate(body, strict=True)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs_match_the_tokens_returned(client, serving, stream):
    kwargs = dict(model=serving.base_name, prompt="The capital of France is", temperature=0, max_tokens=6,
                  logprobs=2)
    if stream:
        chunks = [_completion_chunk(c) for c in client.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs)]
        usage = chunks[-1].usage
        choices = [choice for chunk in chunks for choice in chunk.choices]
        text = "".join(choice.text for choice in choices)
        tokens = [t for choice in choices for t in choice.logprobs.tokens]
        token_logprobs = [lp for choice in choices for lp in choice.logprobs.token_logprobs]
        tops = [top for choice in choices for top in choice.logprobs.top_logprobs]
        offsets = [o for choice in choices for o in choice.logprobs.text_offset]
    else:
        reply = Completion.model_validate(client.completions.create(**kwargs).model_dump(), strict=True)
        usage, (choice,) = reply.usage, reply.choices
        text, tokens, token_logprobs = choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs
        tops, offsets = choice.logprobs.top_logprobs, choice.logprobs.text_offset
    assert len(tokens) == len(token_logprobs) == len(tops) == usage.completion_tokens == 6
    assert "".join(tokens) == text
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    for token, logprob, top in zip(tokens, token_logprobs, tops):
        assert len(top) == 2
        assert top[token] == logprob == max(top.values())  # greedy: the chosen token is the likeliest


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_puts_the_prompt_first(client, serving, stream):
    ids = _post(f"{serving.http}/tokenize", {"prompt": "Good morning", "add_special_tokens": False})[1]["tokens"]
    for prompt, echoed in ((["Hello there", "Good morning"], ["Hello there", "Good morning"]), (ids, ["Good morning"])):
        kwargs = dict(model=serving.base_name, prompt=prompt, temperature=0, max_tokens=3, echo=True)
        plain = client.completions.create(**{**kwargs, "echo": False})
        if stream:
            texts = {}
            for chunk in client.completions.create(stream=True, **kwargs):
                for choice in _completion_chunk(chunk).choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
        else:
            reply = Completion.model_validate(client.completions.create(**kwargs).model_dump(), strict=True)
            texts = {choice.index: choice.text for choice in reply.choices}
        assert texts == {i: text + plain.choices[i].text for i, text in enumerate(echoed)}


@pytest.mark.parametrize("stream", [False, True])
def test_a_list_of_prompts_reaches_the_engine_together(client, serving, stream):
    """The prompts of one request decode in the same engine steps: four prompts of 256 tokens
    each take about as long as one (the engine batches them), where one after the other would
    take four times as long. (Read from the wall clock, the fastest of two tries each: the
    engine's running-requests gauge, read from /metrics while the request ran, saw 0 in two
    full-suite runs and 4 alone.)"""
    prompts = ["one", "two", "three", "four"]

    def seconds(prompt) -> float:
        started = time.perf_counter()
        reply = client.completions.create(model=serving.base_name, prompt=prompt, max_tokens=256, temperature=0,
                                          stream=stream, extra_body={"ignore_eos": True})
        indexes = ({c.index for chunk in reply for c in _completion_chunk(chunk).choices} if stream
                   else {c.index for c in reply.choices})
        assert indexes == set(range(len(prompt) if isinstance(prompt, list) else 1))
        return time.perf_counter() - started

    alone = min(seconds(prompts[0]) for _ in range(2))
    together = min(seconds(prompts) for _ in range(2))
    assert together < 2.5 * alone, (together, alone)
    # each prompt's answer is the one it gets alone
    together = client.completions.create(model=serving.base_name, prompt=prompts, max_tokens=6, temperature=0)
    for choice in together.choices:
        alone = client.completions.create(model=serving.base_name, prompt=prompts[choice.index], max_tokens=6,
                                          temperature=0)
        assert choice.text == alone.choices[0].text


def test_vllm_bench_serve_payload_is_served(serving):
    # What `vllm bench serve` sends to /v1/completions (vllm/benchmarks/lib/endpoint_request_func.py).
    body = {"model": serving.base_name, "prompt": "hello", "repetition_penalty": 1.0, "max_tokens": 5,
            "logprobs": None, "stream": False, "ignore_eos": True, "temperature": 0.0}
    status, reply = _post(f"{serving.http}/v1/completions", body)
    assert status == 200, reply
    assert Completion.model_validate(reply, strict=True).usage.completion_tokens == 5


# -- vLLM's extras ---------------------------------------------------------------------------------

def test_tokenize_detokenize_round_trip(serving):
    status, tokens = _post(f"{serving.http}/tokenize", {"model": serving.base_name, "prompt": "Hello world",
                                                        "return_token_strs": True})
    assert status == 200
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 0
    assert tokens["max_model_len"] > 0
    status, text = _post(f"{serving.http}/detokenize", {"model": serving.base_name, "tokens": tokens["tokens"]})
    assert (status, text) == (200, {"prompt": "Hello world"})
    status, chat = _post(f"{serving.http}/tokenize", {"messages": QUESTION})
    assert chat["tokens"] == _post(f"{serving.http}/tokenize", {"messages": QUESTION, "add_generation_prompt": True})[1]["tokens"]
    assert len(_post(f"{serving.http}/tokenize", {"messages": QUESTION, "add_generation_prompt": False})[1]["tokens"]) \
        < chat["count"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"prompt": "x", "messages": QUESTION}, 400, "messages"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
])
def test_tokenize_mistakes_are_openai_errors(serving, path, body, status, param):
    status_, error = _post(f"{serving.http}{path}", body)
    assert (status_, error["error"]["param"]) == (status, param), error


def test_version_is_vllms(serving):
    from vllm.version import __version__

    with urllib.request.urlopen(f"{serving.http}/version", timeout=10) as response:
        assert json.loads(response.read()) == {"version": __version__}
