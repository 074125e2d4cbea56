"""What the serving process sets up around its HTTP server. The socket it binds: each accepted
connection has Nagle off (TCP_NODELAY); with it on, a response's second small write on a
kept-alive connection waited for the client's delayed ACK, ~40 ms on every answer after a
connection's first. The heap after start-up: frozen out of the garbage collector's reach, so
that a full collection does not walk it on the event loop (361 ms measured)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from services.serving.server import _HttpServer, bind


def test_every_kept_alive_connection_has_nagle_off():
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    assert sock.proto == socket.IPPROTO_TCP

    async def events(_request):
        async def chunks():
            yield "data: 1\n\n"
            yield "data: 2\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    server = _HttpServer(uvicorn.Config(Starlette(routes=[Route("/", events)]), log_config=None, access_log=False,
                                        lifespan="off"))

    async def run() -> tuple[list[str], list[int]]:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        bodies, nodelay = [], []
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for _ in range(3):  # one connection, kept alive between requests
                    bodies.append((await client.get("/")).text)
                    nodelay += [protocol.transport.get_extra_info("socket").getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_NODELAY) for protocol in server.server_state.connections]
        finally:
            server.should_exit = True
            await task
            sock.close()
        return bodies, nodelay

    bodies, nodelay = asyncio.run(run())
    assert bodies == ["data: 1\n\ndata: 2\n\n"] * 3
    assert len(nodelay) == 3 and all(nodelay), nodelay


def test_the_startup_heap_is_frozen_out_of_the_collectors_reach():
    # A fresh interpreter with what the server module imports (FastAPI, gRPC, protobuf; the engine, later).
    code = ("import gc; import services.serving.server as server; before = len(gc.get_objects()); "
            "server.freeze_startup_heap(); print(before, gc.get_freeze_count(), len(gc.get_objects()))")
    before, frozen, tracked = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                      check=True).stdout.split())
    assert before > 10_000
    assert frozen >= before * 0.9
    assert tracked < 100
