"""POST /v1/completions and `n` of the running serving process, through the official
`openai` client: prompt forms, choice numbering, streams with usage, and OpenAI
error bodies for every client mistake (never a 500)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(serving) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)


def _raw(url: str, body: dict | bytes) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_completion_counts_usage_and_honours_max_tokens(client, serving):
    reply = client.completions.create(model=serving.base_name, prompt=PROMPT, temperature=0, max_tokens=7)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert reply.model == serving.base_name
    (choice,) = reply.choices
    assert choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    tokenizer_count = len(_tokenizer(serving).encode(PROMPT))
    assert reply.usage.prompt_tokens == tokenizer_count
    assert 1 <= reply.usage.completion_tokens <= 7
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 7


def _tokenizer(serving):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(serving.model_dir)


def test_text_and_token_id_prompts_agree_and_batches_number_their_choices(client, serving):
    ids = _tokenizer(serving).encode(PROMPT)
    by_text = client.completions.create(model=serving.base_name, prompt=PROMPT, temperature=0, max_tokens=6)
    by_ids = client.completions.create(model=serving.base_name, prompt=ids, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=serving.base_name, prompt=[PROMPT, "Hello"], temperature=0,
                                      max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(ids) + len(_tokenizer(serving).encode("Hello"))
    sampled = client.completions.create(model=serving.base_name, prompt=[PROMPT, "Hello"], temperature=1.0,
                                        seed=3, max_tokens=6, n=2)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in sampled.choices)
    # Prompt tokens count once per prompt, however many choices each gets.
    assert sampled.usage.prompt_tokens == batch.usage.prompt_tokens


def test_n_samples_distinct_choices_on_chat(client, serving):
    reply = client.chat.completions.create(model=serving.base_name, messages=[{"role": "user", "content": "hi"}],
                                           temperature=1.0, max_tokens=12, n=3, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # a random tiny model never repeats 12 tokens x3
    assert 3 <= reply.usage.completion_tokens <= 36
    again = client.chat.completions.create(model=serving.base_name, messages=[{"role": "user", "content": "hi"}],
                                           temperature=1.0, max_tokens=12, n=3, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_n_with_greedy_sampling_is_a_400(client, serving):
    # vLLM samples n > 1 only with temperature > 0; n identical greedy answers are refused, not a 500.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=serving.base_name, prompt=PROMPT, temperature=0, n=2)


def test_stream_equals_the_whole_completion_and_reports_usage(client, serving):
    whole = client.completions.create(model=serving.base_name, prompt=PROMPT, temperature=0, max_tokens=8)
    chunks = list(client.completions.create(model=serving.base_name, prompt=PROMPT, temperature=0, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_chat_stream_with_usage_and_n(client, serving):
    chunks = list(client.chat.completions.create(
        model=serving.base_name, messages=[{"role": "user", "content": "hi"}], temperature=1.0, seed=5, max_tokens=5,
        n=2, stream=True, stream_options={"include_usage": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in (0, 1)]
    assert all(texts)
    whole = client.chat.completions.create(
        model=serving.base_name, messages=[{"role": "user", "content": "hi"}], temperature=1.0, seed=5, max_tokens=5,
        n=2)
    assert texts == [c.message.content for c in whole.choices]  # seeded: the stream is the whole answer, in pieces
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_stream_is_sse_ending_with_done(serving):
    status, text = _raw(f"{serving.http}/v1/completions",
                        {"model": serving.base_name, "prompt": PROMPT, "max_tokens": 3, "stream": True})
    assert status == 200
    events = [line for line in text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"prompt": []}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
    ({"prompt": "x " * 5000}, "prompt"),
    ({"max_tokens": 10 ** 6}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"echo": True, "logprobs": 3}, "echo"),  # echo alone and logprobs alone are served (OpenAI's)
    ({"logprobs": 21}, "logprobs"),
    ({"suffix": "end"}, "suffix"),
    ({"stop": ""}, "stop"),
])
def test_client_mistakes_are_400_with_the_param_named(serving, change, param):
    body = {"model": serving.base_name, "prompt": PROMPT, **change}
    for stream in (False, True):
        status, text = _raw(f"{serving.http}/v1/completions", {**body, "stream": stream})
        assert status == 400, text
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("BadRequestError", 400)
        assert error["param"] == param, error
        assert error["message"]


def test_context_length_exceeded_says_so(client, serving):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=serving.base_name, prompt="x " * 5000, max_tokens=2)
    assert "maximum context length" in info.value.response.json()["error"]["message"]


def test_no_op_and_ignored_fields_pass(client, serving):
    reply = client.completions.create(model=serving.base_name, prompt=PROMPT, max_tokens=2, echo=False,
                                      logprobs=None, best_of=1, user="someone")
    assert reply.choices[0].text is not None


def test_unknown_model_and_malformed_json(client, serving):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt=PROMPT)
    assert info.value.response.json()["error"] == {
        "message": "The model `no-such-model` does not exist.", "type": "NotFoundError", "param": "model",
        "code": 404}
    status, text = _raw(f"{serving.http}/v1/completions", b"{not json")
    assert status == 400 and json.loads(text)["error"]["type"] == "BadRequestError"
    status, text = _raw(f"{serving.http}/v1/completions", b"[1, 2]")
    assert status == 400 and json.loads(text)["error"]["type"] == "BadRequestError"
