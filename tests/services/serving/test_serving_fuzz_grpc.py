"""The admin AdapterService fuzzed over real gRPC: requests built from the proto descriptors
(tests/grpc_fuzz.py), biased toward plausible-but-wrong adapters (a real PEFT adapter under
names of every kind, copies of it with each metadata file broken, a directory that is no
adapter, files, paths outside the adapter root, symlink escapes). Every reply is a proper
status code naming the field, never UNKNOWN or INTERNAL; the server stays SERVING and keeps
loading a good adapter.

Two servers: the session's serving process (its vLLM engine, the one of the session; it has no
--adapter_root), and an AdapterService with an adapter root on an in-process gRPC server whose
registry validates for real and records what the engine would load (a second vLLM engine is
not allowed in a test session; everything refused is refused before the engine is reached)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import shutil
import threading

import grpc
import pytest
from hypothesis import given, settings, strategies as st

from libs.common import checkpoint
from libs.common.server import create_server
from protos.tuneforge.serving.v1 import serving_pb2 as pb
from protos.tuneforge.serving.v1 import serving_pb2_grpc
from services.serving.adapters import AdapterRegistry
from services.serving.admin import SERVICE_NAME, AdapterService, registrar
from services.serving.config import NAME
from tests.grpc_fuzz import assert_serving, check, constructor, messages, reached, unary

NAMES = ["fuzz-a", "fuzz-b", "fuzz.c:1@x+y"]  # valid names a fuzzed load may register (unloaded after each)
WRONG_NAMES = ["", " ", "has space", "-leading", "x" * 129, "é", "a\x00b", "\u202eevil", "a\nb"]


def mostly(valid: list, wrong: list) -> st.SearchStrategy:
    """Valid about three times in four: a name past the name check to the adapter's own."""
    return st.sampled_from(valid * max(1, 3 * len(wrong) // len(valid)) + wrong)


def half(valid: list, wrong: list) -> st.SearchStrategy:
    """Valid half the time: an adapter path, each wrong one about as likely as the valid ones."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(wrong))


def broken_copies(good: pathlib.Path, root: pathlib.Path, engine: bool = True) -> dict[str, pathlib.Path]:
    """Copies of a good adapter, each with one thing wrong. `sealed` ones get a fresh
    manifest.json, so the damage is met by the check behind the sha256 one. `engine`: also
    those only a real engine can refuse (weights that are not safetensors)."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}

    def copy(name: str, change, sealed: bool = True) -> None:
        target = root / name
        shutil.copytree(good, target)
        change(target)
        if sealed:
            checkpoint.write_manifest(target)
        made[name] = target

    def edit(file: str, update=None, text: str | None = None):
        def change(target: pathlib.Path) -> None:
            if text is not None:
                (target / file).write_text(text)
            else:
                data = json.loads((target / file).read_text())
                data.update(update)
                (target / file).write_text(json.dumps(data))

        return change

    copy("manifest-not-json", lambda t: (t / "manifest.json").write_text("{"), sealed=False)
    copy("manifest-list", lambda t: (t / "manifest.json").write_text("[]"), sealed=False)
    copy("manifest-files-list", lambda t: (t / "manifest.json").write_text('{"files": []}'), sealed=False)
    copy("manifest-entry-empty", lambda t: (t / "manifest.json").write_text(
        '{"files": {"adapter_config.json": {}}}'), sealed=False)
    copy("manifest-lists-missing", lambda t: (t / "adapter_model.safetensors").unlink(), sealed=False)
    copy("tampered", lambda t: (t / "adapter_model.safetensors").write_bytes(b"tampered"), sealed=False)
    copy("config-not-json", edit("adapter_config.json", text="{"))
    copy("config-list", edit("adapter_config.json", text="[]"))
    copy("rank-text", edit("adapter_config.json", {"r": "eight"}))
    copy("rank-huge", edit("adapter_config.json", text=(good / "adapter_config.json").read_text().replace(
        '"r": 8', '"r": 1e999')))
    copy("rank-32", edit("adapter_config.json", {"r": 32}))
    copy("rank-pattern-list", edit("adapter_config.json", {"rank_pattern": [4]}))
    copy("modules-to-save-number", edit("adapter_config.json", {"modules_to_save": 5}))
    copy("modules-to-save", edit("adapter_config.json", {"modules_to_save": ["lm_head"]}))
    copy("args-not-json", edit("args.json", text="{"))
    copy("base-nul", edit("args.json", {"model": "a\x00b"}))
    copy("base-number", edit("args.json", {"model": 5}))
    copy("base-elsewhere", edit("args.json", {"model": "/nonexistent/model"}))
    copy("base-list", lambda t: ((t / "args.json").unlink(), edit("adapter_config.json", {
        "base_model_name_or_path": ["x"]})(t)))
    if engine:
        copy("weights-not-safetensors", lambda t: (t / "adapter_model.safetensors").write_bytes(b"not safetensors"))
    return made


# --- the session's serving process --------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(serving):
    with grpc.insecure_channel(serving.grpc) as channel:
        yield serving_pb2_grpc.AdapterServiceStub(channel)


@pytest.fixture(scope="module")
def adapters(make_lora, tmp_path_factory, serving):
    good = make_lora("ada", rank=8, seed=1)
    root = tmp_path_factory.mktemp("admin-fuzz")
    (root / "not-an-adapter").mkdir()
    paths = {"good": good, "run": good.parent, **broken_copies(good, root / "broken")}
    wrong = ([str(p) for name, p in paths.items() if name not in ("good", "run")]
             + [str(root / "not-an-adapter"), str(good / "adapter_config.json"), str(root / "missing"),
                str(serving.model_dir), "", "\x00", "x" * 300, "a/" * 2100, "~/adapter", "relative/adapter"])
    return {"good": str(good), "run": str(good.parent), "wrong": wrong}


def unload_fuzzed(admin, keep: set[str]) -> None:
    for adapter in admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters:
        if adapter.name not in keep:
            admin.UnloadAdapter(pb.UnloadAdapterRequest(name=adapter.name), timeout=30)


@pytest.mark.slow
def test_admin_fuzz(admin, serving, adapters):
    before = {a.name for a in admin.ListAdapters(pb.ListAdaptersRequest(), timeout=30).adapters}
    names = mostly(NAMES, WRONG_NAMES + [serving.base_name])
    paths = half([adapters["good"], adapters["run"]], adapters["wrong"])
    loads = messages(pb.LoadAdapterRequest, only={"LoadAdapterRequest.name": names, "LoadAdapterRequest.path": paths})
    any_loads = messages(pb.LoadAdapterRequest, hints={"LoadAdapterRequest.name": names,
                                                       "LoadAdapterRequest.path": paths})
    unloads = messages(pb.UnloadAdapterRequest, hints={"UnloadAdapterRequest.name": names})

    @settings(max_examples=settings().max_examples)
    @given(load=st.one_of(loads, loads, any_loads), unload=unloads)
    def fuzz(load, unload):
        try:
            reply = unary(admin.LoadAdapter, load, timeout=120)
            check(reply, load)
            if reply.code == grpc.StatusCode.OK:
                assert NAME.match(load.name) and load.name != serving.base_name, constructor(load)
                assert load.path in (adapters["good"], adapters["run"]), constructor(load)
                assert reply.messages[0].adapter.state == pb.ADAPTER_STATE_READY, reply
            reply = unary(admin.UnloadAdapter, unload)
            check(reply, unload)
            listed = unary(admin.ListAdapters, pb.ListAdaptersRequest())
            check(listed, pb.ListAdaptersRequest())
        finally:
            unload_fuzzed(admin, keep=before)

    fuzz()
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"} <= set(reached(pb.LoadAdapterRequest))
    assert {"OK", "NOT_FOUND"} <= set(reached(pb.UnloadAdapterRequest))
    assert_serving(serving.grpc, [SERVICE_NAME])
    ready = admin.LoadAdapter(pb.LoadAdapterRequest(name="fuzz-after", path=adapters["good"]), timeout=120).adapter
    assert ready.state == pb.ADAPTER_STATE_READY and ready.rank == 8
    admin.UnloadAdapter(pb.UnloadAdapterRequest(name="fuzz-after"), timeout=30)


# --- an AdapterService with --adapter_root --------------------------------------------------------


@pytest.fixture(scope="module")
def rooted(tmp_path_factory, publish_adapter, recording_engine):
    """An AdapterService with an adapter root on 127.0.0.1:0; its registry's engine records loads."""
    tmp = tmp_path_factory.mktemp("admin-root")
    base = tmp / "base"
    base.mkdir()
    root = tmp / "adapters"
    inside = publish_adapter(root / "run" / "checkpoint-1", base)
    outside = publish_adapter(tmp / "elsewhere" / "checkpoint-1", base)
    (root / "link").symlink_to(tmp / "elsewhere")
    leaky = publish_adapter(root / "leaky" / "checkpoint-1", base)
    (leaky / "stolen").symlink_to(outside / "adapter_model.safetensors")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("no adapter")
    broken = broken_copies(inside, root / "broken", engine=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    class Watched(recording_engine):
        """Records every path the registry asks the engine to load."""

        def __init__(self):
            super().__init__()
            self.added: list[pathlib.Path] = []

        async def add_lora(self, name, path):
            self.added.append(pathlib.Path(path))
            return await super().add_lora(name, path)

    engine = Watched()
    registry = AdapterRegistry(engine, base, "base-model", max_lora_rank=16, adapter_root=root)
    server, port, _health = create_server("127.0.0.1:0", registrar(AdapterService(registry, loop)), "serving")
    valid = [str(inside), "run", "run/checkpoint-1", str(root / "run")]
    wrong = [str(outside), str(tmp / "elsewhere"), str(root / "link"), str(root / "link" / "checkpoint-1"),
             str(leaky), "leaky", "../elsewhere", "run/../../elsewhere", str(root / "run" / ".." / "run"), "empty",
             "file.txt", str(root), ".", "", "/", "/etc", "~", "~no-such-user/x", "missing", "\x00", "x" * 300,
             *[str(path) for path in broken.values()], *[f"broken/{name}" for name in broken]]
    try:
        yield {"address": f"127.0.0.1:{port}", "valid": valid, "wrong": wrong, "engine": engine,
               "inside": inside.resolve(), "broken": broken}
    finally:
        server.stop(1).wait()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_admin_with_adapter_root_fuzz(rooted):
    names = mostly(NAMES, WRONG_NAMES + ["base-model"])
    paths = half(rooted["valid"], rooted["wrong"])
    loads = messages(pb.LoadAdapterRequest, only={"LoadAdapterRequest.name": names, "LoadAdapterRequest.path": paths})
    any_loads = messages(pb.LoadAdapterRequest, hints={"LoadAdapterRequest.name": names,
                                                       "LoadAdapterRequest.path": paths})
    with grpc.insecure_channel(rooted["address"]) as channel:
        admin = serving_pb2_grpc.AdapterServiceStub(channel)

        @settings(max_examples=settings().max_examples)
        @given(load=st.one_of(loads, loads, any_loads))
        def fuzz(load):
            try:
                reply = unary(admin.LoadAdapter, load)
                check(reply, load)
                if reply.code == grpc.StatusCode.OK:
                    assert NAME.match(load.name) and load.path in rooted["valid"], constructor(load)
                    assert pathlib.Path(reply.messages[0].adapter.path) == rooted["inside"]
                assert set(rooted["engine"].added) <= {rooted["inside"]}, "the engine was asked to load from outside the root"
            finally:
                unload_fuzzed(admin, keep=set())

        fuzz()
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(reached(pb.LoadAdapterRequest))
        assert_serving(rooted["address"], [SERVICE_NAME])
        ready = admin.LoadAdapter(pb.LoadAdapterRequest(name="after", path="run"), timeout=30).adapter
        assert ready.state == pb.ADAPTER_STATE_READY and pathlib.Path(ready.path) == rooted["inside"]


# --- regressions: the minimal examples the fuzzers printed ----------------------------------------
# Found on the session's serving process or here; every one is refused before the engine is
# reached, so they run here, on the in-process server, without a vLLM engine.


def loaded(rooted, name: str, path: str):
    with grpc.insecure_channel(rooted["address"]) as channel:
        return unary(serving_pb2_grpc.AdapterServiceStub(channel).LoadAdapter, pb.LoadAdapterRequest(name=name, path=path))


def test_a_nul_byte_in_the_path_is_an_invalid_argument(rooted):
    # was UNKNOWN: "Exception calling application: embedded null byte"
    reply = loaded(rooted, "fuzz-a", "\x00")
    assert (reply.code, reply.details) == (grpc.StatusCode.INVALID_ARGUMENT, "path: '\\x00' contains a NUL byte at offset 0")


def test_a_home_of_no_user_is_not_found(rooted):
    # was UNKNOWN: "Exception calling application: Could not determine home directory."
    reply = loaded(rooted, "fuzz-a", "~no-such-user/x")
    assert (reply.code, reply.details) == (
        grpc.StatusCode.NOT_FOUND, "path: '~no-such-user/x': ~no-such-user names the home of user 'no-such-user', "
                                   "who does not exist")


WRONG_SHAPES = {
    # was UNKNOWN: "Exception calling application: embedded null byte"
    "base-nul": "{adapter}: the base model it records, 'a\\x00b', contains a NUL byte at offset 1",
    # was UNKNOWN: "Exception calling application: cannot convert float infinity to integer"
    "rank-huge": "{adapter}/adapter_config.json: r and rank_pattern must be integers",
    # was UNKNOWN: "Exception calling application: 'list' object has no attribute 'values'"
    "rank-pattern-list": "{adapter}/adapter_config.json: rank_pattern must be an object (module pattern -> rank)",
    # was UNKNOWN: "Exception calling application: 'int' object is not iterable"
    "modules-to-save-number": "{adapter}/adapter_config.json: modules_to_save must be a list of module names",
}


@pytest.mark.parametrize("broken", sorted(WRONG_SHAPES))
def test_adapter_metadata_of_the_wrong_shape_is_a_failed_precondition(rooted, broken):
    adapter, message = rooted["broken"][broken], WRONG_SHAPES[broken]
    reply = loaded(rooted, "fuzz-a", str(adapter))
    assert (reply.code, reply.details) == (grpc.StatusCode.FAILED_PRECONDITION, "path: " + message.format(adapter=adapter))
