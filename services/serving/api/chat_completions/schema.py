"""Request and response shapes of POST /v1/chat/completions (OpenAI's)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
# Sent by some clients with no effect on the answer; accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Fields of other message kinds (name, tool_call_id, ...) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, `developer` as `system`."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)  # as vLLM flattens text parts
        message = {**(self.model_extra or {}), "role": "system" if self.role == "developer" else self.role,
                   "content": content or ""}
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The parameters this server honours. Any other parameter set to something other
    than its no-op value is refused (400 naming it) rather than silently ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Choices per prompt; bounded, as each one costs a sequence in the engine's batch.
    n: int = Field(default=1, ge=1, le=MAX_N)

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop):
        if stop == "" or (isinstance(stop, list) and not all(stop)):
            raise ValueError("stop strings must not be empty")
        return stop

    def unsupported(self) -> list[str]:
        """Parameters given with an effect this server does not implement (yet)."""
        return sorted(key for key, value in (self.model_extra or {}).items()
                      if key not in IGNORED and not is_noop(value))

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def completion_limit(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; either works, the new one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def is_noop(value: Any) -> bool:
    """Values clients send for a parameter they did not mean to use."""
    return value in (None, False, 0, "", [], {}, "none") or value == {"type": "text"}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
