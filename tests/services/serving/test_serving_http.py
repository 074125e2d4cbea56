"""The OpenAI HTTP API of the running serving process, through the official
`openai` client: model list, chat completions whole and streamed, OpenAI error
bodies, /health and /metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request

import openai
import pytest

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "who are you?"}]


@pytest.fixture(scope="module")
def client(serving) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0)


def _raw(url: str, body: dict | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as exc:
        text, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def test_models_lists_the_base_model_first(client, serving):
    models = client.models.list()
    assert models.object == "list"
    base = models.data[0]
    assert base.id == serving.base_name
    assert base.object == "model"
    assert base.parent is None
    assert base.root == str(serving.model_dir)
    assert client.models.retrieve(serving.base_name).id == serving.base_name


def test_chat_completion_on_the_base_model(client, serving):
    reply = client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == serving.base_name
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_greedy_is_deterministic_and_max_tokens_is_honoured(client, serving):
    answers = [client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0,
                                              max_tokens=8) for _ in range(2)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    one = client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0, max_tokens=1)
    assert one.usage.completion_tokens == 1
    assert one.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(client, serving):
    def sample(seed):
        return client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=1.0,
                                              top_p=0.9, seed=seed, max_tokens=16).choices[0].message.content

    assert sample(7) == sample(7)


def test_stop_string_ends_the_completion(client, serving):
    free = client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    assert len(text) >= 4, f"need a few characters of greedy output to pick a stop string from, got {text!r}"
    stop = text[2:4]
    cut = client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0, max_tokens=24,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    # The same greedy text, ending before the first occurrence of the stop string (not included).
    assert cut.choices[0].message.content == text[:text.index(stop)]


def test_streamed_chat_equals_the_whole_one(client, serving):
    whole = client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model=serving.base_name, messages=QUESTION, temperature=0,
                                                 max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_is_server_sent_events_ending_with_done(serving):
    request = urllib.request.Request(
        f"{serving.http}/v1/chat/completions",
        data=json.dumps({"model": serving.base_name, "messages": QUESTION, "max_tokens": 4, "temperature": 0,
                         "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][len("data: "):])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_unknown_model_is_404_with_openai_error_body(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert info.value.status_code == 404
    assert info.value.response.json() == {"error": {
        "message": "The model `no-such-model` does not exist.", "type": "NotFoundError", "param": "model",
        "code": 404}}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION, stream=True)


@pytest.mark.parametrize("change, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    ({"max_tokens": 10 ** 6}, "max_tokens"),
    ({"logprobs": "yes"}, "logprobs"),  # logprobs: true is served (OpenAI's)
    ({"audio": {"voice": "alloy"}}, "audio"),  # an OpenAI parameter this server does not implement
    ({"n": 17}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"model": 7}, "model"),
    ({"messages": "who are you?"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"stream_options": {"include_usage": "often"}}, "stream_options.include_usage"),
    ({"messages": [{"role": "user", "content": "x " * 5000}]}, "messages"),  # over the context length
    ({"frobnicate": 1}, "frobnicate"),  # unknown field: refused by name, as OpenAI does
])
def test_client_mistakes_are_400_never_500(serving, change, param):
    body = {"model": serving.base_name, "messages": QUESTION, **change}
    status, error = _raw(f"{serving.http}/v1/chat/completions", body)
    assert status == 400, error
    assert error["error"]["type"] == "BadRequestError"
    assert error["error"]["code"] == 400
    assert error["error"]["param"] == param
    assert error["error"]["message"]


def test_a_huge_prompt_is_a_400_and_the_server_stays_up(client, serving):
    huge = "who are you? " * 80_000  # about 1 MB, far over the context length
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=serving.base_name, messages=[{"role": "user", "content": huge}],
                                           max_tokens=2, stream=stream)
        assert "maximum context length" in info.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=serving.base_name, prompt=huge, max_tokens=2)
    assert _raw(f"{serving.http}/health") == (200, {"status": "ok"})
    assert client.chat.completions.create(model=serving.base_name, messages=QUESTION, max_tokens=2).choices


def test_malformed_json_is_400(serving):
    request = urllib.request.Request(f"{serving.http}/v1/chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert error["type"] == "BadRequestError" and error["param"] is None
    assert error["message"].startswith("the request body is not valid JSON: ") and "(character 1)" in error["message"]


def test_health_and_metrics(serving, client):
    client.chat.completions.create(model=serving.base_name, messages=QUESTION, max_tokens=2)
    status, body = _raw(f"{serving.http}/health")
    assert (status, body) == (200, {"status": "ok"})
    with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
        page = response.read().decode()
    assert 'tuneforge_serving_http_requests_total{code="200",endpoint="/v1/chat/completions"}' in page
    assert "tuneforge_serving_generated_tokens_total" in page
    assert "tuneforge_serving_grpc_requests_total" in page or "tuneforge_serving_adapter_loads_total" in page
    assert "vllm:" not in page  # vLLM's colon names fail promlint; serving exports its own


def test_metrics_page_passes_promtool(serving, client):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    client.chat.completions.create(model=serving.base_name, messages=QUESTION, max_tokens=2)
    with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
        page = response.read()
    lint = subprocess.run([promtool, "check", "metrics"], input=page, capture_output=True, timeout=30)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()
