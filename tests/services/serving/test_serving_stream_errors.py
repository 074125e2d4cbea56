"""A failure after a stream has started (HTTP 200 already sent): both completion
endpoints send the text so far, then one event with OpenAI's error body, then
`data: [DONE]`; the request's lease and ticket are released. The handlers' event
streams run here on a scripted engine output (an engine cannot be made to fail
mid-stream on demand)."""

from __future__ import annotations

import asyncio
import json

import pytest

from libs.common.errors import Unavailable
from services.serving.api.chat_completions import handler as chat_handler
from services.serving.api.chat_completions.schema import ChatCompletionRequest
from services.serving.api.completions import handler as completions_handler
from services.serving.api.completions.schema import CompletionRequest
from services.serving.api.generation import Delta


class Job:
    """What the event streams use of generation.Job: the usage tally and close()."""

    class tally:
        @staticmethod
        def usage():
            return {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}

    closed = 0

    def close(self):
        self.closed += 1


async def failing(exc: Exception):
    yield Delta(0, "Hel", None)
    raise exc


def events(stream) -> list[str]:
    async def collect():
        return [event async for event in stream]

    return asyncio.run(collect())


def requests():
    """(endpoint, request, its event stream over `deltas` for `job`): chat's without tool parsers."""
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
                                 stream_options={"include_usage": True})
    yield "chat", lambda job, deltas: chat_handler._events(chat, job, deltas, [None])
    completion = CompletionRequest(model="m", prompt="hi", stream=True)
    yield "completions", lambda job, deltas: completions_handler._events(completion, job, deltas)


@pytest.mark.parametrize("exc, status, error_type", [
    (Unavailable("the inference engine has stopped; restart the server"), 503, "ServiceUnavailableError"),
    (RuntimeError("a bug of ours"), 500, "InternalServerError"),
])
def test_a_failure_mid_stream_is_a_final_error_event_then_done(exc, status, error_type):
    for endpoint, stream in requests():
        job = Job()
        sent = events(stream(job, failing(exc)))
        assert all(event.startswith("data: ") and event.endswith("\n\n") for event in sent), endpoint
        assert sent[-1] == "data: [DONE]\n\n", endpoint
        error = json.loads(sent[-2][6:])
        assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
        assert (error["error"]["code"], error["error"]["type"]) == (status, error_type), endpoint
        if status == 503:
            assert error["error"]["message"] == "the inference engine has stopped; restart the server"
        else:  # our bug: no internals leak to the client
            assert "a bug of ours" not in sent[-2]
        text = "".join(choice.get("text") or choice.get("delta", {}).get("content") or ""
                       for event in sent[:-2] for choice in json.loads(event[6:])["choices"])
        assert text == "Hel", endpoint  # what was generated before the failure reached the client
        assert not any('"usage": {' in event for event in sent[:-2] if '"choices": []' in event)
        assert job.closed == 1, endpoint
