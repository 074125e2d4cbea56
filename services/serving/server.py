"""The serving process: the vLLM engine, the OpenAI HTTP API, the admin gRPC
services (adapters, rollouts) and the optional checkpoint follower, in one asyncio loop; a ready file
once all of them serve; graceful drain on SIGTERM/SIGINT.

`tuneforge serve serving [flags]` lands in `main`; `tuneforge deploy` in
services/serving/cli.py, which runs the same `serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import time

import uvicorn

from libs.common import config as cfg
from libs.common import auth, channels, logs, tls
from libs.common.errors import FailedPrecondition, Problems, TuneForgeError, Unavailable
from libs.common.server import create_server, write_ready_file
from services.serving.adapters import AdapterRegistry
from services.serving.admission import Admission
from services.serving.admin import AdapterService, registrar
from services.serving.api.app import build_app
from services.serving.api.chat_completions.tools import ToolCalling
from services.serving.api.state import ServingState
from services.serving.config import (DeployConfig, parse_adapters, parse_follow_jobs, resolve_base_model,
                                     served_name)
from services.serving.engine import Engine
from services.serving.follow import CheckpointFollower, FollowPolicy
from services.serving.rollout import RolloutService
from services.serving.rollout import registrar as rollout_registrar

LOG = logging.getLogger("tuneforge.serving")


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: this process decides when to drain."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind(host: str, port: int) -> socket.socket:
    """Binds the HTTP socket ourselves, so port 0 works and we know the port before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose socket
    # says TCP. With proto 0 every response on a kept-alive connection waited ~40 ms for the
    # client's delayed ACK (a small write after a small write), which put 40 ms on every TTFT.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # Linux copies the listener's TCP_NODELAY to each accepted connection: the same, twice over.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(f"cannot bind {host}:{port}: {exc.strerror}", field="port") from exc
    return sock


def freeze_startup_heap() -> None:
    """Moves every object alive after start-up (vLLM, torch, transformers: millions of them) out
    of the garbage collector's reach, as vLLM's own server does: a full collection walked them
    all on the event loop, 361 ms during which no request was answered (a TTFT p90 of 0.5-1.5 s
    in the serving benchmark). Later garbage is collected as before."""
    gc.collect()
    gc.freeze()


def check_adapters(registry: AdapterRegistry, adapters: dict[str, str]) -> None:
    """Validates the --adapters against the base model and limits; all problems at once."""
    found = []
    for name, path in adapters.items():
        try:
            registry.validate(name, path)
        except TuneForgeError as exc:
            found.append(f"adapters: {name}: {exc.message}")
    if found:
        raise Problems(found)


def admin_keys(config: DeployConfig) -> auth.BearerKeyInterceptor | None:
    """The admin gRPC services' key check (every service on the port but health and reflection)."""
    keys = config.admin_keys()
    if not keys:
        return None
    return auth.BearerKeyInterceptor(keys, flag="--admin_api_key" if config.admin_api_key else "--api_key")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _serve(config: DeployConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    started = time.perf_counter()
    channels.configure(config.tls_ca, config.tls_client_cert, config.tls_client_key)
    server_tls = tls.server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    if server_tls is not None:
        server_tls.credentials()  # a bad certificate fails now, before the engine's minute
    model_dir = resolve_base_model(config)
    adapters = parse_adapters(config.adapters)
    base_name = served_name(config, model_dir)
    # Everything checkable without the engine fails now, in a second, not after a minute of engine start.
    registry = AdapterRegistry(None, model_dir, base_name, config.max_lora_rank, config.adapter_root)
    check_adapters(registry, adapters)
    sock = bind(config.host, config.port)
    http_port = sock.getsockname()[1]
    logs.log(LOG, logging.INFO, "starting engine", model=str(model_dir), served_model_name=base_name)
    try:
        engine = Engine.start(model_dir, config.max_loras, config.max_lora_rank, config.max_model_len,
                              config.torch_dtype, config.max_cpu_loras)
    except BaseException:
        sock.close()
        raise
    registry.engine = engine
    grpc_server = follower = None
    try:
        await engine.mix_safely()
        if config.lora_merge_single:
            await engine.merge_single_lora(True)
        for name, path in adapters.items():
            await registry.load(name, path)
        state = ServingState(engine=engine, registry=registry, base_name=base_name, model_dir=model_dir,
                             admission=Admission(config.max_concurrent_requests),
                             tool_call_parser=config.tool_call_parser,
                             enable_auto_tool_choice=config.enable_auto_tool_choice,
                             tool_calling=ToolCalling(engine.tokenizer(), config.tool_call_parser, base_name)
                             if config.tool_call_parser else None)
        http = _HttpServer(uvicorn.Config(
            build_app(state, config.api_key, config.metrics), log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=max(1, round(config.grace_period)), timeout_keep_alive=5))
        http_task = asyncio.create_task(http.serve(sockets=[sock]), name="http")
        while not http.started:
            if http_task.done():
                raise Unavailable(f"the HTTP server on {config.host}:{http_port} did not start")
            await asyncio.sleep(0.05)
        admin, rollout = registrar(AdapterService(registry, loop)), rollout_registrar(RolloutService(state, loop))
        grpc_server, grpc_port, health = create_server(
            f"{_url_host(config.host)}:{config.grpc_port}", lambda server: [*admin(server), *rollout(server)], "serving",
            config.grpc_max_streams, config.grpc_unary_threads, streams_flag="--grpc_max_streams",
            tls_config=server_tls, keys=admin_keys(config))
        if config.trainer_address:
            policy = FollowPolicy(config.follow_policy, parse_follow_jobs(config.follow_jobs))
            follower = CheckpointFollower(config.trainer_address, registry, policy)
            follower.start()
        ports = {"http_port": http_port, "grpc_port": grpc_port}
        if config.metrics:
            ports["metrics_port"] = http_port
        freeze_startup_heap()
        write_ready_file(config.ready_file, **ports)
        url = f"http://{_url_host(config.host)}:{http_port}/v1"
        logs.log(LOG, logging.INFO, "serving", url=url, grpc=f"{config.host}:{grpc_port}", model=base_name,
                 adapters=list(adapters), trainer=config.trainer_address,
                 engine_seconds=round(engine.started_seconds, 2),
                 startup_seconds=round(time.perf_counter() - started, 2))
        print(f"TuneForge serving {base_name} at {url} (admin gRPC {config.host}:{grpc_port}); "
              "Ctrl-C or SIGTERM to stop", file=sys.stdout, flush=True)

        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)
        if http_task.done() and not stop.is_set():
            raise Unavailable("the HTTP server stopped unexpectedly")
        stop_wait.cancel()

        # Drain: probes see NOT_SERVING / 503 first, then no new work is taken and in-flight work finishes.
        logs.log(LOG, logging.INFO, "draining", grace_period=config.grace_period)
        state.draining = True
        health.enter_graceful_shutdown()
        if follower:
            await follower.stop()
        http.should_exit = True
        grpc_stopped = grpc_server.stop(config.grace_period)
        await http_task
        await asyncio.to_thread(grpc_stopped.wait)
    finally:
        if follower:
            await follower.stop()
        if grpc_server is not None:
            grpc_server.stop(0)
        sock.close()
        engine.shutdown()
    logs.log(LOG, logging.INFO, "stopped")
    return 0


def serve(config: DeployConfig) -> int:
    logs.setup("serving", config.log_level)
    return asyncio.run(_serve(config))


def main(argv: list[str]) -> int:
    return serve(cfg.parse(DeployConfig, argv, prog="tuneforge serve serving"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
