"""Request and response shapes of POST /v1/chat/completions (OpenAI's).

Requests are validated strictly, as OpenAI's API does: `"max_tokens": "5"` or `"stream": 1` is a
400 naming the field, not coerced. The JSON schema pydantic derives from these models is the
endpoint's OpenAPI schema, and the HTTP fuzzer generates from it: it must say what is accepted."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from services.serving.api.sampling import MAX_TOP_LOGPROBS, SamplingFields

MAX_N = 16
# Values clients send for a parameter they did not mean to use (see `is_noop`).
NOOP_VALUES: list[Any] = [None, False, 0, "", [], {}, "none", {"type": "text"}]
# OpenAI's range for `seed`, a signed 64-bit integer: [-2**63, 2**63). vLLM's engine cannot take
# more (a 500 once). Written with an exclusive maximum: FastAPI's OpenAPI writes bounds as doubles,
# which hold 2**63 exactly but not 2**63 - 1.
SEED_LIMIT = 2 ** 63

StopString = Annotated[str, StringConstraints(min_length=1)]


def other_parameters(schema: dict[str, Any]) -> None:
    """JSON schema of the parameters a request may add beyond those declared: any name, at a
    no-op value only (any other value is refused by name, see `unsupported`)."""
    schema["additionalProperties"] = {"enum": NOOP_VALUES}


class OpenAIRequest(BaseModel):
    """What both completion requests share: strict types, the parameters some clients send with
    no effect on the answer (accepted and ignored, whatever their value), and the refusal of
    any other parameter this server does not implement."""

    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=other_parameters)

    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None

    def unsupported(self) -> list[str]:
        """Parameters given with an effect this server does not implement (yet)."""
        return sorted(key for key, value in (self.model_extra or {}).items() if not is_noop(value))


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Fields of other message kinds pass through to the chat template.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    # OpenAI's other message fields; typed, as chat templates index into them.
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it: text content, `developer` as `system`."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)  # as vLLM flattens text parts
        message = {**(self.model_extra or {}), "role": "system" if self.role == "developer" else self.role,
                   "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        if self.tool_calls is not None:
            message["tool_calls"] = [{**call.model_dump(), "function": {
                "name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls]
        return message


def _arguments(text: str) -> dict[str, Any] | str:
    """A call's arguments as chat templates take them (Qwen's writes `arguments | tojson`): the
    object the JSON text holds, as vLLM's renderer and dataprep parse it, so that the model sees
    its own call as it was trained on it whatever spacing the client wrote; text that is not a
    JSON object is left as written."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: FunctionDefinition

    def for_template(self) -> dict[str, Any]:
        """As `apply_chat_template(tools=...)` takes it (and as dataprep renders tools)."""
        return self.model_dump(exclude_none=True)


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields, OpenAIRequest):
    """The parameters this server honours. Any other parameter set to something other
    than its no-op value is refused (400 naming it) rather than silently ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(default=None, ge=-SEED_LIMIT, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Choices per prompt; bounded, as each one costs a sequence in the engine's batch.
    n: int = Field(default=1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def vllm_fields(self) -> dict[str, Any]:
        """The fields vLLM's ChatCompletionRequest turns into sampling parameters. Messages
        are rendered by us (engine.chat_prompt), so vLLM's model gets none."""
        fields = self.model_dump(by_alias=True, exclude_none=True, exclude={
            "model", "messages", "tools", "tool_choice", "user", "metadata", "store", "service_tier",
            "parallel_tool_calls", "max_tokens", "max_completion_tokens", "stream", "stream_options"})
        fields = {key: value for key, value in fields.items() if key not in (self.model_extra or {})}
        return {**fields, "messages": []}

    def completion_limit(self) -> int | None:
        # max_completion_tokens replaced max_tokens in OpenAI's API; either works, the new one wins.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def is_noop(value: Any) -> bool:
    """Values clients send for a parameter they did not mean to use."""
    return value in NOOP_VALUES


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # the calls vLLM's --tool_call_parser found in the answer (chat_completions/tools.py)
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's chat logprobs: one entry per generated token."""

    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: its id, type and name once, then its arguments in pieces."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
