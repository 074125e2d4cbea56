"""Request and response shapes of vLLM's /tokenize and /detokenize (its TokenizeCompletionRequest,
TokenizeChatRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse), strictly typed."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.serving.api.chat_completions.schema import ChatMessage, Tool


class TokenizeRequest(BaseModel):
    """A text (`prompt`) or a conversation (`messages`, rendered with the chat template), not both."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # Optional, as in vLLM: every model served shares the base model's tokenizer; a name given must exist.
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    # vLLM's defaults: special tokens (BOS) for a text; the template writes its own for messages.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
