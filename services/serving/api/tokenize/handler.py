"""Tokenizes a text or a conversation and detokenizes token ids with the served model's
tokenizer (adapters share it), answering as vLLM's /tokenize and /detokenize do."""

from __future__ import annotations

import asyncio

from libs.common.errors import InvalidArgument
from services.serving.api.models.handler import get_model
from services.serving.api.state import ServingState
from services.serving.api.tokenize.schema import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


async def tokenize(request: TokenizeRequest, state: ServingState) -> TokenizeResponse:
    if request.model is not None:
        get_model(state, request.model)  # NotFound (404) for a name not served
    if (request.prompt is None) == (request.messages is None):
        raise InvalidArgument("give either `prompt` (a text) or `messages` (a conversation)",
                              field="messages" if request.messages is not None else "prompt")
    tokenizer = state.engine.tokenizer()
    if request.messages is not None:
        if request.add_special_tokens:
            raise InvalidArgument("add_special_tokens with messages: the chat template writes the special "
                                  "tokens itself", field="add_special_tokens")
        tools = [tool.for_template() for tool in request.tools] if request.tools else None
        tokens = await state.engine.chat_prompt([m.for_template() for m in request.messages], tools,
                                                request.add_generation_prompt)
    else:
        special = True if request.add_special_tokens is None else request.add_special_tokens
        tokens = await asyncio.to_thread(lambda: list(tokenizer.encode(request.prompt, add_special_tokens=special)))
    strs = tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens,
                            token_strs=strs)


async def detokenize(request: DetokenizeRequest, state: ServingState) -> DetokenizeResponse:
    if request.model is not None:
        get_model(state, request.model)
    state.engine.check_token_ids(request.tokens, "tokens")
    tokenizer = state.engine.tokenizer()
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, request.tokens))
