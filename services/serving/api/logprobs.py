"""Token logprobs in OpenAI's two shapes, from the engine's per-token candidates (vLLM's
`Logprob`s: the chosen token's plus the top k, each with its rank and decoded text): chat's
list of `{token, logprob, bytes, top_logprobs}` and legacy completions' parallel lists."""

from __future__ import annotations

import math
from dataclasses import dataclass

# JSON has no -inf; vLLM's server writes this in its place (a token the sampler could never pick).
FLOOR = -9999.0


@dataclass
class TokenChoice:
    """One generated token and the candidates the engine reported for its position."""

    token_id: int
    candidates: dict  # token id -> vLLM Logprob


def _logprob(value: float) -> float:
    return FLOOR if math.isinf(value) or math.isnan(value) else max(value, FLOOR)


def _text(token_id: int, logprob, tokenizer) -> str:
    if getattr(logprob, "decoded_token", None) is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _top(choice: TokenChoice, k: int, tokenizer) -> list[tuple[str, float]]:
    """The k most likely candidates, most likely first (the chosen token is reported even
    when it is not among them; it is then left out here, as OpenAI does)."""
    ranked = sorted(choice.candidates.items(), key=lambda item: -item[1].logprob)[:k]
    return [(_text(token_id, logprob, tokenizer), _logprob(logprob.logprob)) for token_id, logprob in ranked]


def pair(token_ids, logprobs) -> list[TokenChoice]:
    """A delta's tokens with their candidates (vLLM sends one candidate dict per token)."""
    return [TokenChoice(token_id, dict(candidates)) for token_id, candidates in zip(token_ids, logprobs)]


def chat(tokens: list[TokenChoice], k: int, tokenizer) -> dict:
    """OpenAI's `choice.logprobs` of a chat completion (or of one streamed chunk)."""
    content = []
    for choice in tokens:
        chosen = choice.candidates[choice.token_id]
        text = _text(choice.token_id, chosen, tokenizer)
        content.append({
            "token": text, "logprob": _logprob(chosen.logprob), "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
                             for t, lp in _top(choice, k, tokenizer)]})
    return {"content": content}


def completion(tokens: list[TokenChoice], k: int, tokenizer, offset: int) -> dict:
    """OpenAI's `choice.logprobs` of a text completion; `offset`: where the first token's text
    starts in the choice's text (after an echoed prompt, or after earlier streamed chunks)."""
    text_offset, token_logprobs, texts, top = [], [], [], []
    for choice in tokens:
        chosen = choice.candidates[choice.token_id]
        text = _text(choice.token_id, chosen, tokenizer)
        text_offset.append(offset)
        offset += len(text)
        token_logprobs.append(_logprob(chosen.logprob))
        texts.append(text)
        top.append(dict(_top(choice, k, tokenizer)) if k else {text: _logprob(chosen.logprob)})
    return {"text_offset": text_offset, "token_logprobs": token_logprobs, "tokens": texts, "top_logprobs": top}
