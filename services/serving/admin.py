"""The admin gRPC service (AdapterService): load (from a path or pushed bytes), unload and
list adapters.

It runs on the shared sync gRPC server (its own threads) and calls into the
engine's asyncio loop, where the adapter registry lives."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

from libs.common.errors import InvalidArgument, grpc_errors
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving.adapters import AdapterRegistry, AdapterView, State

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name

_STATES = {
    State.LOADING: serving_pb2.ADAPTER_STATE_LOADING,
    State.READY: serving_pb2.ADAPTER_STATE_READY,
    State.FAILED: serving_pb2.ADAPTER_STATE_FAILED,
}


def to_proto(view: AdapterView) -> serving_pb2.Adapter:
    return serving_pb2.Adapter(name=view.name, path=view.path, state=_STATES[view.state], error=view.error,
                               base_model=view.base_model, rank=view.rank, load_seconds=view.load_seconds)


class AdapterService(serving_pb2_grpc.AdapterServiceServicer):
    def __init__(self, registry: AdapterRegistry, loop: asyncio.AbstractEventLoop):
        self.registry = registry
        self.loop = loop

    def _run(self, coroutine: Coroutine):
        # A load is not cancelled when its caller leaves: it finishes and the adapter serves.
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    @grpc_errors
    def LoadAdapter(self, request, context):
        view = self._run(self.registry.load(request.name, request.path))
        return serving_pb2.LoadAdapterResponse(adapter=to_proto(view))

    @grpc_errors
    def PushAdapter(self, request, context):
        files: dict[str, bytes] = {}
        for index, file in enumerate(request.files):
            if file.name in files:
                raise InvalidArgument(f"{file.name!r} is given twice", field=f"files[{index}].name")
            files[file.name] = file.content
        view = self._run(self.registry.push(request.name, files))
        return serving_pb2.PushAdapterResponse(adapter=to_proto(view))

    @grpc_errors
    def UnloadAdapter(self, request, context):
        view = self._run(self.registry.unload(request.name))
        return serving_pb2.UnloadAdapterResponse(adapter=to_proto(view))

    @grpc_errors
    def ListAdapters(self, request, context):
        async def snapshot():  # read on the loop, where the registry changes
            return self.registry.list()

        return serving_pb2.ListAdaptersResponse(adapters=[to_proto(v) for v in self._run(snapshot())])


def registrar(service: AdapterService):
    """The `register` callback of libs.common.server.create_server."""

    def register(server):
        serving_pb2_grpc.add_AdapterServiceServicer_to_server(service, server)
        return [SERVICE_NAME]

    return register
