"""The client of the serving service's admin gRPC port: push an adapter's files, unload it,
and generate completions of token-id prompts (RolloutService). gRPC failures surface as
libs.common.errors types carrying the server's message; an unreachable server is named."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from libs.common import channels
from libs.common.errors import TuneForgeError, Unavailable, from_rpc_error
from protos.tuneforge.serving.v1 import serving_pb2 as pb
from protos.tuneforge.serving.v1 import serving_pb2_grpc as pb_grpc

_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (ended on a stop token, kept last) or "length"


_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class ServingClient:
    """One channel to a serving process's admin gRPC address (host:port), TLS when the
    process's client TLS is configured, sending `api_key` (else TUNEFORGE_API_KEY) where
    serving's --admin_api_key / --api_key requires one. Close it."""

    def __init__(self, address: str, api_key: str | None = None):
        self.address = address
        self._channel = channels.open_channel(address, options=_CHANNEL_OPTIONS,
                                              api_key=channels.admin_api_key(api_key))
        self._adapters = pb_grpc.AdapterServiceStub(self._channel)
        self._rollouts = pb_grpc.RolloutServiceStub(self._channel)

    def wait_ready(self, timeout: float) -> None:
        """Unavailable naming the address unless a server answers there within `timeout` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"no serving service answers at {self.address} (waited {timeout:g} s)") from None

    def _typed(self, error: grpc.RpcError) -> TuneForgeError:
        return from_rpc_error(error, "serving", self.address)

    def push_adapter(self, name: str, files: dict[str, bytes], timeout: float | None = 300) -> pb.Adapter:
        """Loads (or replaces) adapter `name` from its PEFT files' bytes; returns it READY."""
        request = pb.PushAdapterRequest(name=name, files=[pb.AdapterFile(name=k, content=v) for k, v in files.items()])
        try:
            return self._adapters.PushAdapter(request, timeout=timeout).adapter
        except grpc.RpcError as exc:
            raise self._typed(exc) from None

    def unload_adapter(self, name: str, timeout: float | None = 60) -> None:
        try:
            self._adapters.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._typed(exc) from None

    def generate(self, model: str, prompts: list[list[int]], seeds: list[int | None], *, n: int, max_tokens: int,
                 temperature: float, top_p: float = 1.0, top_k: int = -1, stop_token_ids: tuple[int, ...] = (),
                 timeout: float | None = None) -> list[list[Generated]]:
        """n completions of each prompt (prompt i seeded with seeds[i]), in prompt order;
        `model` is an adapter's name or "" for the base model."""
        sampling = pb.RolloutSampling(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                      stop_token_ids=list(stop_token_ids))
        request = pb.GenerateRequest(model=model, sampling=sampling, prompts=[
            pb.RolloutPrompt(token_ids=list(p), seed=s) if s is not None else pb.RolloutPrompt(token_ids=list(p))
            for p, s in zip(prompts, seeds, strict=True)])
        try:
            response = self._rollouts.Generate(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._typed(exc) from None
        return [[Generated(tuple(c.token_ids), _REASONS.get(c.finish_reason, "unspecified")) for c in r.completions]
                for r in response.results]

    def close(self) -> None:
        self._channel.close()
