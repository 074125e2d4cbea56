"""`DeployConfig`: the flags of `tuneforge deploy` / `tuneforge serve serving`
(ms-swift's `swift deploy` names), and resolving which base model to serve."""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field

from libs.common.errors import NotFound, Problems, TuneForgeError
from libs.common import adapter_dir, channels, tls
from libs.common.vllm_platform import LORA_RANKS

DTYPES = ("auto", "float32", "bfloat16", "float16")
FOLLOW_POLICIES = ("final", "best", "all")
# The name clients pass as `model`: what OpenAI model ids look like, no spaces or control characters.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


@dataclass
class DeployConfig:
    """One serving process: a vLLM engine with a base model and LoRA adapters behind an
    OpenAI-compatible HTTP API, plus the admin gRPC service for adapters."""

    model: str | None = field(default=None, metadata={
        "help": "base model directory; unset: read from the first adapter's args.json, else the embedded default model"})
    adapters: list[str] = field(default_factory=list, metadata={
        "help": "LoRA adapters to load at start, as NAME=PATH (PATH: an adapter or a run directory -> its newest checkpoint)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the HTTP and admin gRPC servers"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the OpenAI API (0 picks a free one)"})
    grpc_port: int = field(default=0, metadata={"help": "admin gRPC port (0 picks a free one)"})
    # The admin RPCs are unary and Health/Watch takes no thread: its streams are reflection's (grpcurl).
    grpc_max_streams: int = field(default=8, metadata={
        "help": "admin gRPC streams served at once (reflection), each holding a thread; one more fails at once "
                "with RESOURCE_EXHAUSTED naming this flag"})
    grpc_unary_threads: int = field(default=16, metadata={
        "help": "admin gRPC threads that streams never take, for LoadAdapter and the other unary RPCs and health "
                "checks: a unary call waits at most for another unary call, never for a stream"})
    metrics: bool = field(default=True, metadata={"help": "serve Prometheus /metrics on the HTTP port"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "name of the base model in the API; unset: the base model directory's name"})
    max_loras: int = field(default=4, metadata={
        "help": "adapters the engine runs in one batch; requests for more wait for a slot, they do not fail"})
    max_cpu_loras: int | None = field(default=None, metadata={
        "help": "adapters kept in CPU memory, least recently used evicted (and reloaded from disk when asked for "
                "again); unset: max_loras. The adapters registered are not bounded"})
    max_lora_rank: int = field(default=16, metadata={
        "help": "largest adapter rank accepted", "choices": list(LORA_RANKS)})
    lora_merge_single: bool = field(default=False, metadata={
        "help": "CPU: an engine step whose tokens all run the same adapter multiplies by the base weights with "
                "that adapter merged in (one product per layer, cached until the adapter changes) instead of "
                "base product + LoRA ops; for rollout servers, one policy at a time. Costs two copies of every "
                "LoRA-targeted weight (the base read back from vLLM's packed form, and the merged one)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "longest prompt + completion in tokens; unset: the model's"})
    torch_dtype: str | None = field(default=None, metadata={
        "help": "weights dtype; unset: float32 on CPU, auto on GPU", "choices": list(DTYPES)})
    max_concurrent_requests: int = field(default=256, metadata={
        "help": "completion requests in flight (running or queued in the engine); more get HTTP 429"})
    # vLLM's flag names (`vllm serve --tool-call-parser hermes --enable-auto-tool-choice`).
    tool_call_parser: str | None = field(default=None, metadata={
        "help": "vLLM tool parser that turns the model's tool calls into `message.tool_calls` (hermes for "
                "ChatML/Qwen-style templates, llama3_json, ...); unset: tool_choice other than none is refused"})
    enable_auto_tool_choice: bool = field(default=False, metadata={
        "help": "accept tool_choice \"auto\" (the default when a request has tools); needs tool_call_parser"})
    api_key: str | None = field(default=None, metadata={
        "help": "require `Authorization: Bearer API_KEY` on /v1, and on the admin gRPC services unless "
                "admin_api_key is given"})
    admin_api_key: str | None = field(default=None, metadata={
        "help": "require `authorization: Bearer ADMIN_API_KEY` gRPC metadata on the admin services (load, unload, "
                "push adapters; rollouts) instead of api_key; health and reflection stay open"})
    tls_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate chain: serve the admin gRPC over TLS (with tls_key); health and reflection too"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of tls_cert"})
    tls_client_ca: str | None = field(default=None, metadata={
        "help": "PEM CA certificates: admin gRPC clients must present a certificate one of them signed (mutual TLS)"})
    tls_ca: str | None = field(default=None, metadata={
        "help": "PEM CA certificates trusted when following a trainer over TLS (env TUNEFORGE_TLS_CA); unset: plaintext"})
    tls_client_cert: str | None = field(default=None, metadata={
        "help": "PEM certificate presented to a trainer that requires mutual TLS (env TUNEFORGE_TLS_CLIENT_CERT)"})
    tls_client_key: str | None = field(default=None, metadata={
        "help": "PEM private key of tls_client_cert (env TUNEFORGE_TLS_CLIENT_KEY)"})
    adapter_root: str | None = field(default=None, metadata={
        "help": "load adapters only from inside this directory (after resolving `..` and symlinks); unset: anywhere"})
    trainer_address: str | None = field(default=None, metadata={
        "help": "host:port of a trainer: hot-load the checkpoints it publishes that follow_policy promotes"})
    follow_policy: str = field(default="final", metadata={
        "help": "which published checkpoints of a job go live: final (its last checkpoint only), best (each one "
                "whose eval loss is lower than every earlier one of the job), all (every one)",
        "choices": list(FOLLOW_POLICIES)})
    follow_jobs: list[str] = field(default_factory=list, metadata={
        "help": "adapters to follow, as PATTERN or PATTERN=POLICY (shell-style pattern over the adapter name a job "
                "publishes, first match decides, POLICY overrides follow_policy); unset: every adapter"})
    ready_file: str | None = field(default=None, metadata={"help": "write pid and bound ports here (JSON) once serving"})
    grace_period: float = field(default=10.0, metadata={"help": "seconds in-flight requests get to finish on shutdown"})
    log_level: str = field(default="INFO", metadata={"help": "log level", "choices": ["DEBUG", "INFO", "WARNING", "ERROR"]})

    def problems(self) -> list[str]:
        found: list[str] = []
        try:
            parse_adapters(self.adapters)
        except Problems as exc:
            found.extend(exc.problems)
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                found.append(f"{name}: must be in [0, 65535]; got {value}")
        if self.port and self.port == self.grpc_port:
            found.append(f"grpc_port: must differ from port ({self.port})")
        for name in ("max_loras", "grpc_max_streams", "grpc_unary_threads"):
            if getattr(self, name) < 1:
                found.append(f"{name}: must be at least 1; got {getattr(self, name)}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            found.append(f"max_cpu_loras: must be at least max_loras ({self.max_loras}); got {self.max_cpu_loras}")
        if self.adapter_root is not None and not pathlib.Path(self.adapter_root).expanduser().is_dir():
            found.append(f"adapter_root: {self.adapter_root} is not a directory")
        if self.tool_call_parser is not None:
            from services.serving.api.chat_completions.tools import unknown_parser  # imports vLLM: only when set

            if problem := unknown_parser(self.tool_call_parser):
                found.append(f"tool_call_parser: {problem}")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            found.append("enable_auto_tool_choice: needs tool_call_parser (vLLM's rule: \"auto\" tool choice "
                         "parses the model's tool calls with it)")
        if self.max_concurrent_requests < 1:
            found.append(f"max_concurrent_requests: must be at least 1; got {self.max_concurrent_requests}")
        if self.max_model_len is not None and self.max_model_len < 2:
            found.append(f"max_model_len: must be at least 2; got {self.max_model_len}")
        if self.served_model_name is not None and not NAME.match(self.served_model_name):
            found.append(f"served_model_name: {self.served_model_name!r} is not a valid model name "
                         "(letters, digits and ._:/@+- , at most 128)")
        if self.grace_period < 0:
            found.append(f"grace_period: must not be negative; got {self.grace_period}")
        for name in ("api_key", "admin_api_key"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                found.append(f"{name}: must not be empty")
        try:
            parse_follow_jobs(self.follow_jobs)
        except Problems as exc:
            found.extend(exc.problems)
        found += tls.server_problems(self.tls_cert, self.tls_key, self.tls_client_ca)
        found += channels.client_problems(self.tls_ca, self.tls_client_cert, self.tls_client_key)
        return found

    def admin_keys(self) -> list[str]:
        """The keys the admin gRPC services accept: admin_api_key, else api_key; none: open."""
        key = self.admin_api_key or self.api_key
        return [key] if key else []


def parse_follow_jobs(specs: list[str]) -> list[tuple[str, str | None]]:
    """`["sft-*=best", "demo"]` -> `[("sft-*", "best"), ("demo", None)]`; every bad entry at once."""
    found: list[str] = []
    rules: list[tuple[str, str | None]] = []
    for spec in specs:
        pattern, sep, policy = spec.partition("=")
        if not pattern:
            found.append(f"follow_jobs: expected PATTERN or PATTERN=POLICY; got {spec!r}")
        elif sep and policy not in FOLLOW_POLICIES:
            found.append(f"follow_jobs: {spec!r}: policy must be one of {', '.join(FOLLOW_POLICIES)}; got {policy!r}")
        else:
            rules.append((pattern, policy if sep else None))
    if found:
        raise Problems(found)
    return rules


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """`["a=/p", "b=/q"]` -> `{"a": "/p", "b": "/q"}`; every malformed entry reported at once."""
    found: list[str] = []
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            found.append(f"adapters: expected NAME=PATH; got {spec!r}")
        elif not NAME.match(name):
            found.append(f"adapters: {name!r} is not a valid adapter name (letters, digits and ._:/@+- , at most 128)")
        elif name in adapters:
            found.append(f"adapters: {name!r} is given twice")
        else:
            adapters[name] = path
    if found:
        raise Problems(found)
    return adapters


def resolve_base_model(config: DeployConfig) -> pathlib.Path:
    """The base model directory: --model; else what the adapters were trained on
    (args.json `model`, as ms-swift reads it; all adapters must agree); else the
    embedded default model."""
    from libs.default_model.resolve import resolve_model  # builds the default model on first use: import late

    if config.model is not None:
        return resolve_model(config.model)
    adapters = parse_adapters(config.adapters)
    if not adapters:
        return resolve_model(None)
    found: list[str] = []
    bases: dict[str, pathlib.Path] = {}
    for name, path in adapters.items():
        try:
            info = adapter_dir.inspect(path, field="adapters")
        except TuneForgeError as exc:
            found.append(f"adapters: {name}: {exc.message}")
            continue
        if info.base_model is None:
            found.append(f"adapters: {name}: {info.path} records no base model "
                         "(no `model` in args.json, no base_model_name_or_path in adapter_config.json); give --model")
            continue
        bases[name] = adapter_dir.normalize(info.base_model)
    if found:
        raise Problems(found)
    first_name, first = next(iter(bases.items()))
    for name, base in bases.items():
        if base != first:
            found.append(f"adapters: {name} was trained on {base} but {first_name} on {first}; "
                         "serve them from separate processes or give --model")
    if found:
        raise Problems(found)
    try:
        return resolve_model(str(first))
    except NotFound as exc:
        raise NotFound(f"base model {first} recorded by adapter {first_name} is not usable: {exc.message}",
                       field="model") from exc


def served_name(config: DeployConfig, model_dir: pathlib.Path) -> str:
    """The base model's name in the API: --served_model_name, else the directory's name."""
    return config.served_model_name or model_dir.name
