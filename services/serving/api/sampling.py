"""Sampling parameters both completion endpoints accept beyond OpenAI's basics (penalties,
top_k, min_p, logit_bias, min_tokens, ignore_eos, stop_token_ids, response_format), typed
strictly for validation and the OpenAPI schema, and their translation into vLLM's
SamplingParams by vLLM's own request protocol (`to_sampling_params`: the same defaults,
structured outputs and logprobs handling as `vllm serve`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from libs.common.errors import InvalidArgument

# OpenAI's bounds where it has them; vLLM's (the engine's max_logprobs default) elsewhere.
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` is the wire name (OpenAI's); the attribute would shadow pydantic's BaseModel.schema.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """vLLM's sampling extensions and OpenAI's penalties, as both endpoints take them."""

    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    # 0 or -1: every token (vLLM's "disabled").
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    # Token id (as a string, OpenAI's JSON form) -> bias added to its logit.
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias):
        for key, value in (bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids written as strings; got {key!r}")
            if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"biases are in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]; got {value} for {key}")
        return bias

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, response_format):
        if response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.json_schema is None:
                raise ValueError("type json_schema needs json_schema.schema")
        return response_format

    def token_ids_to_check(self) -> dict[str, list[int]]:
        """Token ids this request names, by field, for the engine's vocabulary check."""
        found = {}
        if self.stop_token_ids:
            found["stop_token_ids"] = list(self.stop_token_ids)
        if self.logit_bias:
            found["logit_bias"] = [int(key) for key in self.logit_bias]
        return found


def vllm_params(protocol: type[BaseModel], fields: dict[str, Any], max_tokens: int, adjust=None):
    """SamplingParams (DELTA outputs: every token is seen as it comes) from `fields`, the
    request's fields as vLLM's `protocol` model (its Chat/CompletionRequest) takes them,
    after `adjust` (vLLM's tool parser sets its tool-call constraint there, as vLLM's server does).
    Its refusals become InvalidArgument naming the parameter."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    fields = {**fields, "stream": True}
    fields.pop("stream_options", None)
    # vLLM's model caps `stop` at VLLM_MAX_STOP_STRINGS (4, OpenAI's cap); this server has always
    # taken any number (bounded by the body size), so the list is set after validation.
    stop = fields.pop("stop", None)
    try:
        request = protocol.model_validate(fields)
        request.stop = stop
        if adjust is not None:
            request = adjust(request)
        # server defaults {}: OpenAI's defaults apply (vLLM's own server would read the model's
        # generation_config.json; our temperature/top_p defaults have always been OpenAI's).
        params = request.to_sampling_params(max_tokens, {})
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = (error.get("ctx") or {}).get("error")
        place = getattr(cause, "parameter", None) or ".".join(str(p) for p in error.get("loc", ())) or None
        raise InvalidArgument(str(error.get("msg", "")).removeprefix("Value error, "), field=place) from exc
    except VLLMValidationError as exc:
        raise InvalidArgument(str(exc.args[0]) if exc.args else "invalid sampling parameters",
                              field=exc.parameter) from exc
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc
    params.output_kind = RequestOutputKind.DELTA
    return params
