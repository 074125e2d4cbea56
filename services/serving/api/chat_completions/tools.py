"""Tool calling on /v1/chat/completions with vLLM's own parsers (`--tool_call_parser`, as
`vllm serve` names them): the parser name checked at start, a request's tool_choice turned into
the constraint vLLM puts on its decoding (required and a named function are guided, so even an
untrained model answers with a call), and the model's text parsed into OpenAI tool calls, whole
or as streamed deltas, with OpenAI's finish_reason rule."""

from __future__ import annotations

import dataclasses
from typing import Any

from libs.common.errors import InvalidArgument


def parser_names() -> list[str]:
    """The tool parsers vLLM registers (hermes, llama3_json, mistral, pythonic, ...)."""
    from vllm.tool_parsers import ToolParserManager

    return ToolParserManager.list_registered()


def unknown_parser(name: str | None) -> str | None:
    """Why --tool_call_parser NAME cannot be served (it names the choices), or None."""
    if name is None:
        return None
    names = parser_names()
    return None if name in names else f"unknown tool parser {name!r}; vLLM has {', '.join(names)}"


@dataclasses.dataclass
class Parsed:
    """A whole answer: its text less the tool calls, and the calls in OpenAI's shape."""

    content: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def _called(tool_choice) -> bool:
    return tool_choice not in (None, "none")


def _named(tool_choice) -> bool:
    return _called(tool_choice) and not isinstance(tool_choice, str)


class ToolCalling:
    """One per server: vLLM's Parser class for the configured tool parser (None without
    --tool_call_parser), instantiated per choice since vLLM's parsers keep stream state."""

    def __init__(self, tokenizer, parser_name: str | None, model_name: str):
        from vllm.parser import ParserManager

        problem = unknown_parser(parser_name)
        if problem:
            raise InvalidArgument(problem, field="tool_call_parser")
        self.tokenizer = tokenizer
        self.parser_name = parser_name
        # vLLM composes a tool parser only with auto tool choice enabled; required and named
        # calls use it too, so it is always composed here and `auto` is gated by our flag.
        try:
            self.parser_cls = ParserManager.get_parser(tool_parser_name=parser_name, enable_auto_tools=True,
                                                       model_name=model_name, tokenizer=tokenizer) \
                if parser_name else None
        except TypeError as exc:  # vLLM's refusal of a parser that does not fit the tokenizer
            raise InvalidArgument(f"--tool_call_parser {parser_name}: {exc}", field="tool_call_parser") from exc

    def _parser(self, request):
        return self.parser_cls(self.tokenizer, request.tools) if self.parser_cls is not None else None

    def adjust(self, request):
        """vLLM's request (its protocol's ChatCompletionRequest) with the structured-output
        constraint its parser derives from tools + tool_choice, as vLLM's server sets it
        before making the sampling parameters."""
        if self.parser_cls is None or not request.tools or not _called(request.tool_choice):
            return request
        return self._parser(request).adjust_request(request)

    def parse(self, request, text: str, token_ids, finish_reason: str | None) -> Parsed:
        """A whole answer parsed as vLLM's server parses it."""
        parser = self._parser(request) if request.tools and _called(request.tool_choice) else None
        if parser is None:
            return Parsed(text, [], finish_reason or "stop")
        _, content, calls = parser.parse(text, request, enable_auto_tools=True, model_output_token_ids=token_ids)
        from vllm.renderers.chat_utils import make_tool_call_id

        tool_calls = [{"id": call.id or make_tool_call_id(), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}} for call in calls or []]
        return Parsed(content, tool_calls, _finish_reason(request.tool_choice, bool(tool_calls), finish_reason))

    def stream(self, request, prompt_token_ids: list[int]) -> "StreamParser":
        parser = self._parser(request) if request.tools and _called(request.tool_choice) else None
        return StreamParser(parser, request, prompt_token_ids)


def _finish_reason(tool_choice, called: bool, finish_reason: str | None) -> str:
    """OpenAI's (and vLLM's) rule: "tool_calls" when the model stopped after calling a tool by
    its own choice (auto) or because it had to (required); a named function ends with "stop"."""
    if called and finish_reason == "stop" and not _named(tool_choice):
        return "tool_calls"
    return finish_reason or "stop"


class StreamParser:
    """One choice's stream: each engine delta becomes (content, tool-call deltas) in OpenAI's
    chunk shape; text that may open a call is held back until the parser knows."""

    def __init__(self, parser, request, prompt_token_ids: list[int]):
        self.parser, self.request, self.prompt_token_ids = parser, request, prompt_token_ids
        self.called = False

    def delta(self, text: str, token_ids: list[int], finish_reason: str | None) -> tuple[str | None, list[dict]]:
        if self.parser is None:
            return (text or None), []
        message = self.parser.parse_delta(text, list(token_ids), self.request, self.prompt_token_ids,
                                          finished=finish_reason is not None)
        if message is None:
            return None, []
        calls = [call.model_dump(exclude_none=True) for call in message.tool_calls or []]
        self.called = self.called or bool(calls)
        return message.content or None, calls

    def finish_reason(self, finish_reason: str | None) -> str:
        return _finish_reason(self.request.tool_choice, self.called, finish_reason)
