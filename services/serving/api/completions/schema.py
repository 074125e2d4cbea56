"""Request and response shapes of POST /v1/completions (OpenAI's legacy text completions)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema, field_validator

from services.serving.api.sampling import MAX_TOP_LOGPROBS, SamplingFields

from services.serving.api.chat_completions.schema import (
    MAX_N,
    SEED_LIMIT,
    OpenAIRequest,
    StopString,
    StreamOptions,
    Usage,
)

# A batch of prompts is bounded like OpenAI's (2048 per request).
MAX_PROMPTS = 2048


_FORMS = "a string, a list of strings, a list of token ids, or a list of non-empty token-id lists"
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# OpenAI's four forms, as `_prompt_form` checks them.
Prompt = Annotated[Any, WithJsonSchema({"anyOf": [
    {"type": "string"},
    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
    _TOKEN_IDS,
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
]})]


def _token_ids(value: Any) -> bool:
    # bool is an int in Python; `true` is not a token id.
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


class CompletionRequest(SamplingFields, OpenAIRequest):
    """The parameters this server honours; any other one set to something other than its
    no-op value is refused (400 naming it) rather than silently ignored."""

    model: str
    # A string, a batch of strings, token ids, or a batch of token-id lists (OpenAI's four forms).
    # Checked by `_prompt_form`, not a Union: a union's errors name each member, not the field.
    prompt: Prompt
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    # OpenAI's default for /v1/completions is 16 tokens, unlike chat's "the rest of the context".
    max_tokens: int | None = Field(default=16, ge=1)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(default=None, ge=-SEED_LIMIT, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    # The prompt's text before each choice's completion.
    echo: bool = False
    # Top alternatives per generated token (0: the chosen token's logprob only).
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Accepted when it equals `n` (the one sample per choice this server draws).
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_form(cls, prompt):
        if isinstance(prompt, str):
            return prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError(f"expected {_FORMS}")
        if len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request; got {len(prompt)}")
        if all(isinstance(p, str) for p in prompt) or all(_token_ids(p) for p in prompt):
            return prompt
        if _token_ids(prompt):
            return prompt
        raise ValueError(f"expected {_FORMS}")

    def unsupported(self) -> list[str]:
        refused = super().unsupported()
        if self.best_of not in (None, 0, self.n):
            refused = [*refused, "best_of"]
        return sorted(refused)

    def vllm_fields(self) -> dict[str, Any]:
        """The fields vLLM's CompletionRequest turns into sampling parameters. Prompts are
        tokenized by us; vLLM's model requires one, so it gets a placeholder."""
        fields = self.model_dump(by_alias=True, exclude_none=True, exclude={
            "model", "prompt", "echo", "best_of", "user", "metadata", "store", "service_tier",
            "parallel_tool_calls", "max_tokens", "stream", "stream_options"})
        fields = {key: value for key, value in fields.items() if key not in (self.model_extra or {})}
        return {**fields, "prompt": [0]}

    def prompts(self) -> list[str | list[int]]:
        """The batch: each entry a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if _token_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per generated token."""

    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
