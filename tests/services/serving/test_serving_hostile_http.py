"""Hand-written hostile requests against the session's real serving process (127.0.0.1, one
vLLM engine), sent as raw bytes: bodies that are not JSON objects, JSON that Python reads but
no other parser should (NaN, 1e400, duplicate keys, lone surrogates), bodies too large, too deep
or never finished, every wrong type where messages belong, unknown models and adapter paths,
limits at and past their bounds, bad streams, and clients that vanish mid-stream. Each gets a
4xx with OpenAI's error body naming what is wrong (or a proper answer when valid); the server
logs no 5xx and stays healthy. The regression tests of what the HTTP fuzzers found live here."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request

import grpc
import openai
import pytest
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.api import body as body_module
from services.serving.api.app import build_app
from services.serving.api.state import ServingState

pytestmark = pytest.mark.slow

TIMEOUT = 30.0
M = "{model}"  # replaced by the served model's name
QUESTION = [{"role": "user", "content": "hi"}]


def send(serving, path: str, raw: bytes | None, headers: dict | None = None, method: str = "POST",
         timeout: float = TIMEOUT) -> tuple[int, dict, str]:
    """(status, headers, body text) of one raw request."""
    host, port = serving.http.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=raw, headers={"Content-Type": "application/json"} if headers is None
                           else headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def error_of(status: int, headers: dict, text: str) -> dict:
    """The OpenAI error body of a 4xx, checked for shape."""
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, text[:300])
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == status and body["error"]["message"], body
    return body["error"]


def server_errors(serving) -> float:
    """5xx answers the server has counted (all endpoints)."""
    with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
        page = response.read().decode()
    return sum(float(value) for value in re.findall(
        r'^tuneforge_serving_http_requests_total\{code="5\d\d",[^}]*\} (\S+)$', page, re.M))


@pytest.fixture(scope="module", autouse=True)
def no_server_errors(serving):
    """Not one request of this module may be a 5xx, as the server itself counts them."""
    before = server_errors(serving)
    yield
    assert server_errors(serving) == before


def fill(value, model: str):
    if isinstance(value, str):
        return value.replace(M, model)
    if isinstance(value, bytes):
        return value.replace(M.encode(), model.encode())
    return value


CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
VALID = b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2'

# (id, path, raw body, content type or None to send none, status, param, a piece of the message)
RAW = [
    ("malformed", CHAT, b"{not json", "application/json", 400, None, "not valid JSON: Expecting property name"),
    ("truncated", CHAT, VALID, "application/json", 400, None, "not valid JSON"),
    ("text-plain", CHAT, VALID + b"}", "text/plain", 415, None, "got `text/plain`"),
    ("no-content-type", CHAT, VALID + b"}", None, 415, None, "got no Content-Type"),
    ("form", TEXT, b"model=x&prompt=y", "application/x-www-form-urlencoded", 415, None, "Content-Type"),
    ("array", CHAT, b"[1, 2]", "application/json", 400, None, "must be a JSON object; got an array"),
    ("string", CHAT, b'"hi"', "application/json", 400, None, "got a string"),
    ("number", TEXT, b"3", "application/json", 400, None, "got a number"),
    ("null", TEXT, b"null", "application/json", 400, None, "got null"),
    ("empty", CHAT, b"", "application/json", 400, None, "the request body is empty"),
    ("whitespace", CHAT, b"  \n", "application/json", 400, None, "the request body is empty"),
    ("nan", CHAT, VALID + b', "temperature": NaN}', "application/json", 400, None, "NaN is not a JSON value"),
    ("infinity", CHAT, VALID + b', "top_p": -Infinity}', "application/json", 400, None, "-Infinity is not a JSON"),
    ("1e400", CHAT, VALID + b', "temperature": 1e400}', "application/json", 400, None, "1e400 is out of range"),
    ("digits", TEXT, b'{"model": "{model}", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "application/json",
     400, None, "has 5000 digits"),
    ("duplicate-key", CHAT, b'{"model": "x", ' + VALID[1:] + b"}", "application/json", 400, None,
     'duplicate key "model"'),
    ("invalid-utf8", CHAT, VALID[:-17] + b'"content": "\xff\xfe"}], "max_tokens": 2}', "application/json", 400, None,
     "not valid UTF-8: byte"),
    ("latin1", CHAT, VALID.replace(b"hi", "h\u00e9".encode("latin-1")) + b"}", "application/json", 400, None,
     "not valid UTF-8"),
    ("surrogate-content", CHAT, VALID.replace(b"hi", b"\\ud800") + b"}", "application/json", 400,
     "messages.0.content", "lone surrogate \\ud800"),
    # What the hostile-value fuzzer printed (a 500 before: the 404's JSON could not be encoded).
    ("surrogate-model", CHAT, VALID.replace(b"{model}", b"\\ud800") + b"}", "application/json", 400, "model",
     "lone surrogate \\ud800"),
    ("surrogate-key", CHAT, VALID + b', "\\ud800x": 0}', "application/json", 400, None, "a key contains"),
    ("surrogate-prompt", TEXT, b'{"model": "{model}", "prompt": ["ok", "a\\udc00"]}', "application/json", 400,
     "prompt.1", "lone surrogate"),
    ("deep-array", CHAT, VALID + b', "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "application/json",
     400, None, "nests deeper than 64 levels"),
    ("deep-object", TEXT, b'{"model": "{model}", "prompt": "hi", "user": ' + b'{"a": ' * 100_000 + b"1"
     + b"}" * 100_000 + b"}", "application/json", 400, None, "nests deeper than 64 levels"),
    ("deep-message", CHAT, b'{"model": "{model}", "messages": [{"role": "user", "content": "hi", "x": '
     + b"[" * 70 + b"]" * 70 + b"}]}", "application/json", 400, "messages", "nests deeper than 64 levels"),
]


@pytest.mark.parametrize("path, raw, content_type, status, param, message",
                         [case[1:] for case in RAW], ids=[case[0] for case in RAW])
def test_a_body_that_is_not_a_json_object_gets_a_4xx_naming_why(serving, path, raw, content_type, status, param,
                                                                 message):
    headers = {"Content-Type": content_type} if content_type else {}
    error = error_of(*send(serving, path, fill(raw, serving.base_name), headers))
    assert (error["code"], error["param"]) == (status, param), error
    assert message in error["message"], error
    assert "Traceback" not in error["message"]


# (id, path, the request's fields over a valid one, status, param, a piece of the message)
FIELDS = [
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages", "valid list"),
    ("messages-object", CHAT, {"messages": {"role": "user"}}, 400, "messages", "valid list"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages", "at least 1 item"),
    ("messages-number", CHAT, {"messages": [1]}, 400, "messages.0", "valid dictionary"),
    ("messages-null", CHAT, {"messages": [None]}, 400, "messages.0", "valid dictionary"),
    ("messages-none", CHAT, {"messages": None}, 400, "messages", "valid list"),
    ("no-messages", CHAT, {"messages": ...}, 400, "messages", "Field required"),
    ("no-role", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages.0.role", "Field required"),
    ("role-bot", CHAT, {"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role",
     "'system', 'developer', 'user', 'assistant' or 'tool'"),
    ("role-number", CHAT, {"messages": [{"role": 1, "content": "hi"}]}, 400, "messages.0.role", "Input should be"),
    ("content-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content", "string"),
    ("content-bool", CHAT, {"messages": [{"role": "user", "content": True}]}, 400, "messages.0.content", "string"),
    ("content-object", CHAT, {"messages": [{"role": "user", "content": {"text": "hi"}}]}, 400, "messages.0.content",
     "string"),
    ("content-image", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "messages.0.content", "messages.0.content.0.type: Input should be 'text'"),
    ("content-part-number", CHAT, {"messages": [{"role": "user", "content": [7]}]}, 400, "messages.0.content",
     "string"),
    ("name-number", CHAT, {"messages": [{"role": "user", "content": "hi", "name": 3}]}, 400, "messages.0.name",
     "string"),
    ("tool-calls-number", CHAT, {"messages": [{"role": "assistant", "content": "", "tool_calls": 5}, *QUESTION]},
     400, "messages.0.tool_calls", "valid list"),
    ("tool-call-arguments", CHAT, {"messages": [{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}, *QUESTION]},
     400, "messages.0.tool_calls.0.function.arguments", "string"),
    ("unknown-model", CHAT, {"model": "no-such-model"}, 404, "model", "The model `no-such-model` does not exist."),
    ("lora-path-as-model", CHAT, {"model": "/nonexistent/run/checkpoint-7"}, 404, "model", "does not exist"),
    ("lora-path-as-model-text", TEXT, {"model": "/nonexistent/run/checkpoint-7"}, 404, "model", "does not exist"),
    ("lora-path-stream", CHAT, {"model": "./no-such-adapter", "stream": True}, 404, "model", "does not exist"),
    ("model-number", CHAT, {"model": 7}, 400, "model", "string"),
    ("n-0", CHAT, {"n": 0}, 400, "n", "greater than or equal to 1"),
    ("n-huge", CHAT, {"n": 10 ** 30}, 400, "n", "less than or equal to 16"),
    ("n-bool", CHAT, {"n": True}, 400, "n", "valid integer"),
    ("n-string", TEXT, {"n": "2"}, 400, "n", "valid integer"),
    ("max-tokens-0", CHAT, {"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("max-tokens-negative", TEXT, {"max_tokens": -5}, 400, "max_tokens", "greater than or equal to 1"),
    ("max-tokens-huge", CHAT, {"max_tokens": 10 ** 30}, 400, "max_tokens", "maximum context length"),
    ("max-tokens-fraction", CHAT, {"max_tokens": 2.5}, 400, "max_tokens", "valid integer"),
    ("max-tokens-string", CHAT, {"max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ("max-tokens-bool", TEXT, {"max_tokens": True}, 400, "max_tokens", "valid integer"),
    ("max-completion-tokens-0", CHAT, {"max_completion_tokens": 0}, 400, "max_completion_tokens", "greater than"),
    ("temperature-high", CHAT, {"temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ("temperature-string", CHAT, {"temperature": "hot"}, 400, "temperature", "valid number"),
    ("top-p-0", TEXT, {"top_p": 0}, 400, "top_p", "greater than 0"),
    ("stream-string", CHAT, {"stream": "yes"}, 400, "stream", "valid boolean"),
    # What Schemathesis printed (accepted before: pydantic's lax mode read 0 as false).
    ("stream-0", CHAT, {"stream": 0}, 400, "stream", "valid boolean"),
    ("include-usage-0", CHAT, {"stream": True, "stream_options": {"include_usage": 0}}, 400,
     "stream_options.include_usage", "valid boolean"),
    ("stop-empty", CHAT, {"stop": [""]}, 400, "stop", "at least 1 character"),
    ("stop-number", CHAT, {"stop": 5}, 400, "stop", "string"),
    # What the hostile-value fuzzer printed (a 500 before: vLLM cannot serialize the request).
    ("seed-2**64", TEXT, {"seed": 2 ** 64}, 400, "seed", "less than 9223372036854775808"),
    ("seed-2**63", CHAT, {"seed": 2 ** 63}, 400, "seed", "less than 9223372036854775808"),
    ("seed-below", TEXT, {"seed": -(2 ** 63) - 1}, 400, "seed", "greater than or equal to -9223372036854775808"),
    ("unsupported", CHAT, {"modalities": ["audio"], "audio": {"voice": "alloy"}}, 400, "audio",
     "audio, modalities: not supported by this server"),
    ("tool-without-function", CHAT, {"tools": [{"type": "function"}]}, 400, "tools.0.function", "Field required"),
    ("prompt-empty", TEXT, {"prompt": ""}, 400, "prompt", "must not be empty"),
    ("prompt-empty-list", TEXT, {"prompt": []}, 400, "prompt", "expected a string"),
    ("prompt-empty-ids", TEXT, {"prompt": [[1, 2], []]}, 400, "prompt", "expected a string"),
    ("prompt-negative-id", TEXT, {"prompt": [-1]}, 400, "prompt", "token id -1 is outside the vocabulary"),
    ("prompt-huge-id", TEXT, {"prompt": [[5], [2 ** 70]]}, 400, "prompt.1", "outside the vocabulary"),
    ("prompt-bool-ids", TEXT, {"prompt": [True, False]}, 400, "prompt", "expected a string"),
    ("prompt-mixed", TEXT, {"prompt": ["a", [1]]}, 400, "prompt", "expected a string"),
    ("prompt-too-many", TEXT, {"prompt": ["a"] * 2049}, 400, "prompt", "at most 2048 prompts"),
    ("echo-logprobs", TEXT, {"echo": True, "logprobs": 1}, 400, "echo", "echo together with logprobs"),
    ("best-of", TEXT, {"best_of": 3}, 400, "best_of", "best_of: not supported"),
    ("stream-bad-request", CHAT, {"stream": True, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content", "string"),
    ("stream-too-long", TEXT, {"stream": True, "prompt": "x " * 5000}, 400, "prompt", "maximum context length"),
]


def request_body(path: str, change: dict, model: str) -> dict:
    base = ({"model": model, "messages": QUESTION, "max_tokens": 2} if path == CHAT
            else {"model": model, "prompt": "hi", "max_tokens": 2})
    merged = {**base, **change}
    return {key: value for key, value in merged.items() if value is not ...}


@pytest.mark.parametrize("path, change, status, param, message", [case[1:] for case in FIELDS],
                         ids=[case[0] for case in FIELDS])
def test_a_wrong_field_gets_a_4xx_naming_it_and_a_stream_never_starts(serving, path, change, status, param, message):
    status_, headers, text = send(serving, path, json.dumps(request_body(path, change, serving.base_name)).encode())
    error = error_of(status_, headers, text)  # JSON, not a stream that carries the error as an event
    assert (error["code"], error["param"]) == (status, param), error
    assert message in error["message"], error


# (id, path, the request's fields over a valid one, choices expected)
VALID_ODD = [
    ("stop-1000-strings", CHAT, {"stop": [f"never-{i}" for i in range(1000)]}, 1),
    ("n-integral-float", CHAT, {"n": 2.0, "temperature": 1.0}, 2),
    ("seed-min", TEXT, {"seed": -(2 ** 63)}, 1),
    ("seed-max", CHAT, {"seed": 2 ** 63 - 1, "temperature": 1}, 1),
    ("nul-and-controls", CHAT, {"messages": [{"role": "user", "content": "a\u0000b\u001bc\u202e"}]}, 1),
    ("no-op-extras", TEXT, {"logprobs": None, "frequency_penalty": 0, "tools": [], "user": {"any": ["thing"]},
                            "best_of": 1, "echo": False}, 1),
    ("assistant-first", CHAT, {"messages": [{"role": "assistant", "content": "hello"}]}, 1),
    ("empty-content", CHAT, {"messages": [{"role": "user", "content": ""}, {"role": "tool", "content": None}]}, 1),
    ("astral-text", TEXT, {"prompt": "\U0001f600 \u4e2d\u6587"}, 1),
]


@pytest.mark.parametrize("path, change, choices", [case[1:] for case in VALID_ODD], ids=[case[0] for case in VALID_ODD])
def test_an_odd_but_valid_request_gets_a_proper_answer(serving, path, change, choices):
    status, headers, text = send(serving, path, json.dumps(request_body(path, change, serving.base_name)).encode())
    assert status == 200, text[:500]
    reply = json.loads(text)
    assert [choice["index"] for choice in reply["choices"]] == list(range(choices))
    assert all(choice["finish_reason"] in ("stop", "length") for choice in reply["choices"])


def test_unknown_models_and_adapter_paths_are_404_on_every_endpoint(serving):
    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    for name in ("/nonexistent/lora", "no-such-adapter", "../../etc/passwd", serving.base_name + "x"):
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve(name)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=name, prompt="hi", max_tokens=2, stream=True)
    error = error_of(*send(serving, "/v1/models/%ED%A0%80", None, {}, method="GET"))
    assert error["code"] == 404


def test_an_adapter_whose_directory_does_not_exist_or_does_not_load_is_never_served(serving, publish_adapter,
                                                                                    tmp_path):
    """vLLM once answered 200 for a LoRA path that does not exist. Here a load of one is refused,
    one whose weights the engine cannot read ends FAILED, and neither name is ever a model."""
    broken = publish_adapter(tmp_path / "broken", serving.model_dir, weights=b"not safetensors")
    with grpc.insecure_channel(serving.grpc) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="ghost", path=str(tmp_path / "nowhere")), timeout=60)
        with pytest.raises(grpc.RpcError) as unreadable:
            admin.LoadAdapter(serving_pb2.LoadAdapterRequest(name="broken", path=str(broken)), timeout=60)
        states = {a.name: a.state for a in admin.ListAdapters(serving_pb2.ListAdaptersRequest(), timeout=10).adapters}
        try:
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            assert unreadable.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "ghost" not in states and states["broken"] == serving_pb2.ADAPTER_STATE_FAILED
            client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
            assert not {"ghost", "broken"} & {m.id for m in client.models.list().data}
            for name in ("ghost", "broken"):
                with pytest.raises(openai.NotFoundError):
                    client.models.retrieve(name)
                with pytest.raises(openai.NotFoundError):
                    client.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)
                with pytest.raises(openai.NotFoundError):
                    client.completions.create(model=name, prompt="hi", max_tokens=2, stream=True)
        finally:
            admin.UnloadAdapter(serving_pb2.UnloadAdapterRequest(name="broken"), timeout=10)


def test_a_wrong_method_or_path_is_a_4xx_in_openai_shape(serving):
    error = error_of(*send(serving, CHAT, None, {}, method="DELETE"))
    assert error["code"] == 405 and error["type"] == "MethodNotAllowedError"
    error = error_of(*send(serving, "/v1/chat/completion", b"{}"))
    assert error["code"] == 404


def test_a_body_over_the_limit_is_413_without_being_read(serving):
    big = json.dumps({"model": serving.base_name, "messages": [
        {"role": "user", "content": "x" * body_module.MAX_BODY_BYTES}]}).encode()
    started = time.monotonic()
    error = error_of(*send(serving, CHAT, big))
    assert (error["code"], error["type"]) == (413, "RequestTooLargeError")
    assert f"at most {body_module.MAX_BODY_BYTES}" in error["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "x", "prompt": "'
        for _ in range(body_module.MAX_BODY_BYTES // 2 ** 20 + 1):
            yield b"x" * 2 ** 20
        yield b'"}'

    host, port = serving.http.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    connection.request("POST", TEXT, body=chunks(), headers={"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    error = error_of(response.status, dict(response.getheaders()), response.read().decode())
    connection.close()
    assert error["code"] == 413
    assert time.monotonic() - started < 20


def _stall(serving, sent: bytes) -> socket.socket:
    host, port = serving.http.removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1000\r\n\r\n" + sent)
    return stalled


def test_clients_that_stop_halfway_through_their_body_hold_nobody_else_up(serving):
    stalled = [_stall(serving, b'{"model": "' + str(i).encode()) for i in range(20)]
    try:
        client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=10)
        started = time.monotonic()
        for _ in range(3):
            assert client.chat.completions.create(model=serving.base_name, messages=QUESTION, max_tokens=2).choices
        assert send(serving, "/health", None, {}, method="GET", timeout=10)[0] == 200
        assert time.monotonic() - started < 10
    finally:
        for connection in stalled:
            connection.close()
    assert send(serving, "/health", None, {}, method="GET", timeout=10)[0] == 200


def test_a_stalled_body_gets_408_and_its_connection_closes(monkeypatch):
    """The idle timeout, shortened, on serving's real app in a real uvicorn (no engine: the
    request never gets past its body)."""
    monkeypatch.setattr(body_module, "BODY_IDLE_TIMEOUT", 0.5)
    app = build_app(ServingState(engine=None, registry=None, base_name="base", model_dir=None), serve_metrics=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n" + b'{"model": "base"')
        started = time.monotonic()
        answer = b""
        while chunk := stalled.recv(65536):  # until the server closes the connection
            answer += chunk
        stalled.close()
        assert 0.4 < time.monotonic() - started < 5
        head, _, text = answer.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 408 ")
        assert json.loads(text) == {"error": {
            "message": "no part of the request body arrived for 0.5 s (16 bytes came before)",
            "type": "RequestTimeoutError", "param": None, "code": 408}}
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_client_that_leaves_mid_stream_frees_its_slot(serving):
    def in_flight() -> float:
        with urllib.request.urlopen(f"{serving.http}/metrics", timeout=10) as response:
            page = response.read().decode()
        return float(re.search(r"^tuneforge_serving_in_flight_requests (\S+)$", page, re.M).group(1))

    for path, fields in ((CHAT, {"messages": QUESTION}), (TEXT, {"prompt": "Once upon a time"})):
        raw = json.dumps({"model": serving.base_name, **fields, "max_tokens": 1500, "stream": True,
                          "temperature": 1.0}).encode()
        host, port = serving.http.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        connection.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: {")  # the stream has begun
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        deadline = time.monotonic() + 15
        while in_flight() > 0:  # the engine aborted the request, the ticket came back
            assert time.monotonic() < deadline, "a vanished client's request is still in flight"
            time.sleep(0.1)
    client = openai.OpenAI(base_url=f"{serving.http}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    assert client.chat.completions.create(model=serving.base_name, messages=QUESTION, max_tokens=2).choices


# -- any field of a valid request replaced with a hostile value (a Hypothesis fuzzer) ---------

HOSTILE = st.one_of(
    st.integers(min_value=2 ** 63 - 2, max_value=2 ** 200),
    st.integers(min_value=-(2 ** 200), max_value=-(2 ** 63) + 1),
    st.sampled_from([0, -1, 1, 2 ** 31, 2 ** 32, 2 ** 64 - 1, 2 ** 64, -(2 ** 63)]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([-0.0, 5e-324, 1.7976931348623157e308]),
    st.booleans(), st.none(), st.text(max_size=20), st.sampled_from(["", "\u0000", "\ud800", "a\udfffb", "\U0010ffff",
                                                                     "<|im_start|>", "[DONE]", "x" * 10_000]),
    st.lists(st.integers(min_value=-5, max_value=5000), max_size=5), st.just([[[[[]]]]]),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.just({"type": "text"}),
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


BASES = {
    CHAT: {"model": M, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "hi"}]}], "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "n": 1, "seed": 1,
           "stop": ["\n\n"], "stream": False, "stream_options": {"include_usage": True}},
    TEXT: {"model": M, "prompt": ["hi", "there"], "max_tokens": 2, "n": 1, "seed": 1, "stop": "x", "stream": True},
}


@settings(max_examples=settings().max_examples * 2)
@given(data=st.data())
def test_any_field_replaced_by_a_hostile_value_gets_a_proper_answer(serving, data):
    path = data.draw(st.sampled_from([CHAT, TEXT]), label="path")
    base = json.loads(json.dumps(BASES[path]).replace(M, serving.base_name))
    where = data.draw(st.sampled_from([p for p in _paths(base) if p]), label="field")
    request = _replace(base, where, data.draw(HOSTILE, label="value"))
    if where == ("max_tokens",) and type(request["max_tokens"]) is int and 4 < request["max_tokens"] < 10_000:
        request["max_tokens"] = 4  # valid, and cheap to generate; the context-length bound has its own case
    status, headers, text = send(serving, path, json.dumps(request).encode())
    if status == 200:
        if headers.get("content-type", "").startswith("text/event-stream"):
            assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text[-500:]
        else:
            assert json.loads(text)["choices"], text[:300]
    else:
        assert 400 <= status < 500, (status, text[:300])
        error_of(status, headers, text)
