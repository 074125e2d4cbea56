"""DataprepService fuzzed over real gRPC on 127.0.0.1: requests built from the proto descriptors
(tests/grpc_fuzz.py), biased toward plausible-but-wrong values (real dataset files of the
wrong kind, prepared datasets with bad cursors, ranks and world sizes, broken manifests, real
preparation ids). Every reply is a proper status code naming the field, never UNKNOWN or
INTERNAL; a preparation a fuzzed request started ends without an INTERNAL error; the server
stays SERVING and keeps answering normal requests."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
import os
import pathlib
import shutil

import grpc
import pytest
from hypothesis import given, settings, strategies as st

from libs.common.server import create_server
from libs.dataset.ipc import from_ipc_stream
from protos.tuneforge.dataprep.v1 import dataprep_pb2 as pb
from protos.tuneforge.dataprep.v1 import dataprep_pb2_grpc as pb_grpc
from services.dataprep.config import DataprepServerConfig, PrepareConfig
from services.dataprep.pipeline import prepare as prepare_in_process
from services.dataprep.servicer import DataprepServicer, register
from tests.grpc_fuzz import (ODD_TEXT, Reply, assert_serving, check, constructor, messages, reached, stream, texts,
                             unary)

SERVICE = pb.DESCRIPTOR.services_by_name["DataprepService"].full_name
S = pb.PreparationState
TERMINAL = (S.PREPARATION_STATE_SUCCEEDED, S.PREPARATION_STATE_FAILED, S.PREPARATION_STATE_CANCELLED)
# How a preparation may fail: the caller's data or arguments, or a limit; never our bug.
PROPER_ERROR_CODES = {0} | {code.value[0] for code in (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED)}
GOOD_ROWS = 7  # the prepared dataset's rows, in shards of 3, 3, 1


def row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                         {"role": "assistant", "content": f"{2 * i}"}]}


def _write_manifest(directory: pathlib.Path, manifest) -> pathlib.Path:
    directory.mkdir(parents=True)
    (directory / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory, default_model):
    """Real files and directories the strategies point at, under one root that is also the
    server's working directory (relative paths stay inside it)."""
    root = tmp_path_factory.mktemp("dataprep-fuzz")
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps(row(i)) + "\n" for i in range(3)))
    (root / "folder").mkdir()
    shutil.copy(good, root / "folder" / "part.jsonl")
    (root / "notes.md").write_text("not a dataset\n")
    (root / "binary.jsonl").write_bytes(b"\x00\x01\x02" * 10)
    (root / "broken.json").write_text("{not json")
    (root / "empty.jsonl").write_text("")
    (root / "corpus.txt.gz").write_bytes(gzip.compress(b"A first document.\nA second one.\n"))
    # whole for its first 8 KiB (the type check), then cut: the preparation fails on the line it broke
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(good.read_bytes() * 400)[:-64])
    (root / "fake.parquet").write_text("not parquet")
    (root / "rows.csv").write_text("query,response\nhi,hello\n")
    (root / "no-model").mkdir()
    (root / "bad-model").mkdir()
    (root / "bad-model" / "config.json").write_text("[1, 2]")

    prepared = root / "prepared"
    data = root / "seven.jsonl"
    data.write_text("".join(json.dumps(row(i)) + "\n" for i in range(GOOD_ROWS)))
    prepare_in_process(PrepareConfig(dataset=[str(data)], output_dir=str(prepared), shard_rows=3))
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]

    (root / "partial-only").mkdir()
    (root / "partial-only" / "shards.partial.json").write_text('{"shards": [], "columns": null}')
    (root / "empty").mkdir()
    (root / "manifest-binary").mkdir()
    (root / "manifest-binary" / "manifest.json").write_bytes(b"\xff\xfe{")
    first = manifest["shards"][0]
    broken_manifests = {
        "manifest-not-json": "{", "manifest-list": [], "manifest-wrong-format": {"format": "x", "shards": []},
        "shards-not-dicts": {**manifest, "shards": ["shard-00000.arrow"]},
        "shards-missing-keys": {**manifest, "shards": [{}]},
        "shards-wrong-types": {**manifest, "shards": [{"file": 5, "rows": "3", "sha256": None, "tokens": 1}]},
        "shards-negative-rows": {**manifest, "shards": [{**first, "rows": -3}]},
        "shard-missing": manifest,
        "shard-escapes": {**manifest, "shards": [{**first, "file": "../seven.jsonl",
                                                  "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]},
        "columns-wrong": {**manifest, "columns": {"text": "string"}},
    }
    for name, bad in broken_manifests.items():
        _write_manifest(root / name, bad)
    shutil.copytree(prepared, root / "tampered")
    (root / "tampered" / "shard-00001.arrow").write_bytes(b"tampered")
    not_arrow = root / "not-arrow"  # a shard that is not Arrow, listed with its true sha256
    shutil.copytree(prepared, not_arrow)
    (not_arrow / "shard-00000.arrow").write_bytes(b"not arrow at all")
    listed = json.loads((not_arrow / "manifest.json").read_text())
    listed["shards"][0]["sha256"] = hashlib.sha256(b"not arrow at all").hexdigest()
    (not_arrow / "manifest.json").write_text(json.dumps(listed))
    shutil.copytree(prepared, root / "victim")  # a prepared dataset fuzzed preparations may replace
    broken = ["partial-only", "empty", "manifest-binary", *broken_manifests, "tampered", "not-arrow"]
    (root / "cwd").mkdir()
    return {"root": root, "prepared": prepared, "broken": broken, "default_model": default_model}


@pytest.fixture(scope="module")
def server(files):
    """A real DataprepService on 127.0.0.1:0, started in the fixture root's cwd/ directory."""
    here = os.getcwd()
    os.chdir(files["root"] / "cwd")
    servicer = DataprepServicer(DataprepServerConfig(max_concurrent=1, max_pending=4))
    grpc_server, port, _health = create_server("127.0.0.1:0", register(servicer), "dataprep")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.shutdown(10)
        grpc_server.stop(1).wait()
        os.chdir(here)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server) as channel:
        yield pb_grpc.DataprepServiceStub(channel)


def finish(stub, preparation_id: str, wait: float = 30.0) -> pb.Preparation:
    """Lets a fuzzed preparation run for at most `wait` seconds, cancels it if it still runs,
    and returns its terminal state."""
    request = pb.WatchPreparationRequest(id=preparation_id)
    reply = stream(stub.WatchPreparation, request, timeout=wait, limit=10_000)
    if reply.code is None:
        stub.CancelPreparation(pb.CancelPreparationRequest(id=preparation_id), timeout=10)
        reply = stream(stub.WatchPreparation, request, timeout=60, limit=10_000)
    assert reply.code == grpc.StatusCode.OK, reply
    final = reply.messages[-1].preparation
    assert final.state in TERMINAL, final
    return final


def assert_reads_the_prepared_dataset(stub, files) -> None:
    """A normal request still works: the whole prepared dataset, in order."""
    reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir=str(files["prepared"])), timeout=30)
    assert reply.code == grpc.StatusCode.OK, reply
    rows = [r for m in reply.messages for r in from_ipc_stream(m.arrow_ipc).to_pylist()]
    assert len(rows) == GOOD_ROWS and all(r["length"] == len(r["input_ids"]) for r in rows)


# --- PrepareDataset ----------------------------------------------------------------------------


def mostly(valid: list, wrong: list) -> st.SearchStrategy:
    """A field's value: valid nine times in ten, so that requests with a dozen fields still get
    past validation to the code behind it, and wrong otherwise."""
    return st.sampled_from(valid * max(1, 9 * len(wrong) // len(valid)) + wrong)


def prepare_requests(files):
    root = files["root"]
    plausible = {
        "PrepareArguments.dataset": mostly(
            [str(root / "good.jsonl"), str(root / "folder"), str(root / "good.jsonl") + "#2", str(root / "rows.csv"),
             str(root / "g*.jsonl"), "../good.jsonl", str(root / "good.jsonl") + "#99", str(root / "corpus.txt.gz"),
             str(root / "cut.jsonl.gz")],  # passes the call's checks, then fails the preparation on its line 1079
            [str(root / "notes.md"), str(root / "binary.jsonl"), str(root / "broken.json"), str(root / "empty.jsonl"),
             str(root / "fake.parquet"), str(root / "prepared"), str(root / "prepared" / "shard-00000.arrow"),
             str(root / "good.jsonl") + "#0", str(root / "nothing-*.jsonl"), str(root / "missing.jsonl"), "good.jsonl"]),
        "PrepareArguments.model": mostly(["", str(files["default_model"])],
                                         [str(root / "no-model"), str(root / "bad-model"), str(root / "good.jsonl"),
                                          "~no-such-user/x"]),
        "PrepareArguments.task": mostly(["auto", "sft", "pt"], ["kto", "preference", "SFT", " sft"]),
        "PrepareArguments.format": mostly(["auto", "messages"], ["sharegpt", "alpaca", "text", "Messages"]),
        "PrepareArguments.template": mostly(["chatml", "default", "qwen"], ["llama3", "gpt4", ""]),
        "PrepareArguments.loss_scale": mostly(["default", "last_round", "all"], ["none"]),
        "PrepareArguments.truncation_strategy": mostly(["delete", "left", "right"], ["middle"]),
        "PrepareArguments.columns": mostly(['{"q": "query", "a": "response"}', "{}"],
                                           ["[]", "null", '{"a": 1}', "{", '"x"', '{"messages": "messages"}']),
        "PrepareArguments.max_length": mostly([0, 16, 2048], [1, -1]),
        "PrepareArguments.shard_rows": mostly([1, 2, 1000], [0, -1]),
        "PrepareArguments.num_proc": mostly([1], [0, -1]),
        # engine ray starts a Ray runtime in the server (seconds): the fuzzer sends only the local engine's
        # valid values; test_dataprep_ray.py covers ray
        "PrepareArguments.engine": mostly(["local"], ["spark", "Ray", ""]),
        "PrepareArguments.ray_address": st.sampled_from([None] * 6 + ["127.0.0.1:1"]),
        "PrepareArguments.data_seed": mostly([0, 42, -1], [2**31 - 1]),
        "PrepareArguments.system": mostly(["", "You are terse."], list(ODD_TEXT)),
        "PrepareArguments.txt_mode": mostly(["file", "line"], ["para", ""]),
        # valid with task pt (without packing) only: mostly unset (None), so the other tasks' requests stay valid
        "PrepareArguments.block_size": st.sampled_from([None] * 6 + [8, 64, 0]),
    }
    # Where a valid request writes: inside the fixture root only, never a prepared dataset read below.
    safe_relative = st.text(st.characters(blacklist_characters="/\\~", blacklist_categories=("Cs",)), max_size=12)
    outputs = st.one_of(
        st.sampled_from([str(root / "out" / name) for name in ("a", "b", "é 日本")]
                        + [str(root / "notes.md"), str(root / "notes.md" / "below"), str(root / "cwd"), "",
                           "\x00", "out\x00x", "x" * 300, "a/" * 2100, "relative-out", str(root / "victim")]),
        safe_relative.filter(lambda name: name != ".."))
    where = {"PrepareArguments.output_dir": outputs}
    datasets = st.lists(plausible["PrepareArguments.dataset"], min_size=1, max_size=3)
    mostly_valid = messages(pb.PrepareDatasetRequest,  # reaches the preparation
                            only={**plausible, **where, "PrepareArguments.dataset": datasets})
    # A dataset directory is searched recursively: generic paths, but none walking "/" or /usr.
    any_datasets = st.lists(st.one_of(plausible["PrepareArguments.dataset"], texts().filter(small_tree(root))),
                            max_size=4)
    anything = messages(pb.PrepareDatasetRequest, hints=plausible,
                        only={**where, "PrepareArguments.dataset": any_datasets})
    return st.one_of(mostly_valid, mostly_valid, anything)


def small_tree(root: pathlib.Path):
    """Whether a dataset argument names no directory but the fixture's own, /etc and below (the
    server's working directory is root/cwd)."""
    def small(value: str) -> bool:
        if "\x00" in value:
            return True
        try:
            resolved = os.path.realpath(os.path.join(root / "cwd", value.split("#")[0]))
            return not os.path.isdir(resolved) or resolved.startswith((str(root), "/etc"))
        except (OSError, ValueError):
            return True

    return small


def test_prepare_dataset_fuzz(stub, server, files):
    requests = prepare_requests(files)
    outcomes = collections.Counter()

    @settings(max_examples=settings().max_examples)
    @given(request=requests)
    def fuzz(request):
        reply = unary(stub.PrepareDataset, request)
        check(reply, request)
        if reply.code == grpc.StatusCode.OK:
            final = finish(stub, reply.messages[0].preparation.id)
            check_preparation(final, request)
            outcomes[S.Name(final.state)] += 1

    fuzz()
    print(f"preparations started: {dict(outcomes)}")
    assert {"OK", "INVALID_ARGUMENT"} <= set(reached(pb.PrepareDatasetRequest))
    assert {"PREPARATION_STATE_SUCCEEDED", "PREPARATION_STATE_FAILED"} <= set(outcomes)
    assert_serving(server, [SERVICE])
    assert_reads_the_prepared_dataset(stub, files)


def check_preparation(final: pb.Preparation, request: pb.PrepareDatasetRequest) -> None:
    """A preparation's terminal state: no INTERNAL failure, and an error naming its cause."""
    where = f"{constructor(request)} ended {S.Name(final.state)}: {final.error[:500]!r} (code {final.error_code})"
    assert final.error_code in PROPER_ERROR_CODES, where
    assert "internal error" not in final.error and "Traceback" not in final.error, where
    if final.state == S.PREPARATION_STATE_SUCCEEDED:
        manifest = json.loads(final.manifest_json)
        assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_rejected"], manifest


# --- ReadShards --------------------------------------------------------------------------------


def read_requests(files):
    root = files["root"]
    prepared = str(files["prepared"])
    wrong_dirs = ([str(root / name) for name in files["broken"]]
                  + [str(root / "good.jsonl"), str(files["default_model"]), str(root / "missing"), "", "../prepared",
                     str(files["prepared"] / "shard-00000.arrow"), prepared + "/", prepared + "/.", "\x00" + prepared])
    plausible = {
        "ReadShardsRequest.dataset_dir": mostly([prepared], wrong_dirs),
        "ReadShardsRequest.rank": mostly([0, 1, 2], [3, -1, 2**31 - 1]),
        "ReadShardsRequest.world_size": mostly([0, 1, 2, 3], [-1, -2**31]),
        "ReadShardsRequest.max_batch_rows": mostly([0, 1, 2, 5], [-1]),
        "Cursor.shard_index": mostly([0, 1, 2, 3], [4, -1, 2**31 - 1]),
        "Cursor.row": mostly([0, 1, 2, 3], [4, -1, 2**63 - 1]),
        "ReadShardsRequest.seed": mostly([0, 1, 42], [-1, 2**63 - 1, -2**63]),
        "ReadShardsRequest.epoch": mostly([0, 1], [-1, 2**31 - 1]),
        "Holdout.ratio": mostly([0.1, 0.25, 0.5], [0.0, 1.0, -0.5, 1e-300, float("nan"), float("inf")]),
    }
    mostly_valid = messages(pb.ReadShardsRequest, only=plausible)
    anything = messages(pb.ReadShardsRequest, hints=plausible)
    return st.one_of(mostly_valid, mostly_valid, anything)


def test_read_shards_fuzz(stub, server, files):
    requests = read_requests(files)

    @settings(max_examples=settings().max_examples)
    @given(request=requests)
    def fuzz(request):
        reply = stream(stub.ReadShards, request, timeout=30, limit=10_000)
        check(reply, request)
        served = [from_ipc_stream(m.arrow_ipc) for m in reply.messages]
        assert [b.num_rows for b in served] == [m.num_rows for m in reply.messages]
        if request.dataset_dir == str(files["prepared"]):
            assert sum(b.num_rows for b in served) <= GOOD_ROWS

    fuzz()
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"} <= set(reached(pb.ReadShardsRequest))
    assert_serving(server, [SERVICE])
    assert_reads_the_prepared_dataset(stub, files)


# --- GetPreparation, WatchPreparation, CancelPreparation ----------------------------------------


@pytest.fixture(scope="module")
def preparation_ids(stub, files):
    """Real ids: a preparation that succeeded and one that failed (every row rejected)."""
    root = files["root"]
    ids = []
    for dataset, output in ((root / "good.jsonl", root / "ids" / "ok"), (root / "broken.json", root / "ids" / "bad")):
        started = stub.PrepareDataset(pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
            dataset=[str(dataset)], output_dir=str(output))), timeout=30).preparation
        ids.append((started.id, finish(stub, started.id).state))
    assert [state for _, state in ids] == [S.PREPARATION_STATE_SUCCEEDED, S.PREPARATION_STATE_FAILED]
    return [preparation_id for preparation_id, _ in ids]


def test_preparation_ids_fuzz(stub, server, files, preparation_ids):
    ids = st.sampled_from(preparation_ids + [preparation_ids[0].upper(), preparation_ids[0][:8], " " + preparation_ids[1]])

    @settings(max_examples=settings().max_examples // 2)
    @given(data=st.data())
    def fuzz(data):
        for method, request_type, streams in ((stub.GetPreparation, pb.GetPreparationRequest, False),
                                              (stub.WatchPreparation, pb.WatchPreparationRequest, True),
                                              (stub.CancelPreparation, pb.CancelPreparationRequest, False)):
            request = data.draw(messages(request_type, hints={f"{request_type.__name__}.id": ids}))
            reply: Reply = stream(method, request, timeout=30) if streams else unary(method, request)
            check(reply, request)
            if reply.code == grpc.StatusCode.OK:
                assert request.id in preparation_ids

    fuzz()
    for request_type in (pb.GetPreparationRequest, pb.WatchPreparationRequest, pb.CancelPreparationRequest):
        assert {"OK", "NOT_FOUND"} <= set(reached(request_type))
    assert_serving(server, [SERVICE])
    for preparation_id in preparation_ids:  # cancelling a finished preparation changed nothing
        state = stub.GetPreparation(pb.GetPreparationRequest(id=preparation_id), timeout=10).preparation.state
        assert state in (S.PREPARATION_STATE_SUCCEEDED, S.PREPARATION_STATE_FAILED)


# --- regressions: the minimal examples the fuzzers printed ----------------------------------------


def refused(reply: Reply, code: grpc.StatusCode, starts: str) -> str:
    assert reply.code == code and reply.details.startswith(starts), reply
    return reply.details


def test_shard_entries_that_are_not_objects_are_refused_naming_the_entry(stub, files):
    # was UNKNOWN: "Exception iterating responses: string indices must be integers, not 'str'"
    dataset_dir = str(files["root"] / "shards-not-dicts")
    reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir=dataset_dir), timeout=30)
    assert refused(reply, grpc.StatusCode.FAILED_PRECONDITION, f"dataset_dir: {dataset_dir}/manifest.json: shards[0]: ") \
        .endswith("expected an object with file, rows and sha256; got str")
    for name, problem in (("shards-missing-keys", "shards[0]: file: expected a string; got null"),
                          ("shards-wrong-types", "shards[0]: file: expected a string; got 5"),
                          ("shards-negative-rows", "shards[0]: rows: expected 0 or more; got -3"),
                          ("shard-escapes", 'shards[0]: file: expected a file name inside the dataset directory; '
                                            'got "../seven.jsonl"')):
        reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir=str(files["root"] / name)), timeout=30)
        assert refused(reply, grpc.StatusCode.FAILED_PRECONDITION, "dataset_dir: ").endswith(problem), reply


def test_a_nul_byte_in_dataset_dir_is_an_invalid_argument(stub):
    # was UNKNOWN: "Exception iterating responses: embedded null byte"
    reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir="\x00"), timeout=30)
    refused(reply, grpc.StatusCode.INVALID_ARGUMENT, "dataset_dir: '\\x00' contains a NUL byte at offset 0")
    reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir=""), timeout=30)
    refused(reply, grpc.StatusCode.INVALID_ARGUMENT, "dataset_dir: required")


def test_an_error_echoing_a_huge_argument_still_reaches_the_caller(stub):
    # was RESOURCE_EXHAUSTED: "Stream removed (received metadata size exceeds hard limit (value length 360021
    # vs. 16384))": the NOT_FOUND and its field were lost
    reply = unary(stub.GetPreparation, pb.GetPreparationRequest(id="é" * 60000))
    details = refused(reply, grpc.StatusCode.NOT_FOUND, "id: no preparation 'éé")
    assert details.endswith("more characters)") and len(details) < 2000


def test_an_output_dir_that_is_a_file_is_refused_by_the_call(stub, files):
    # was OK, then the preparation FAILED with "internal error: FileExistsError(17, 'File exists')" (INTERNAL)
    notes = files["root"] / "notes.md"
    for output_dir, message in ((notes, f"output_dir: {notes} is a file, not a directory"),
                                (notes / "below", f"output_dir: {notes / 'below'}: {notes} is a file, not a directory")):
        reply = unary(stub.PrepareDataset, pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
            dataset=[str(files["root"] / "good.jsonl")], output_dir=str(output_dir))))
        assert (reply.code, reply.details) == (grpc.StatusCode.INVALID_ARGUMENT, message)


def test_a_listed_shard_that_is_not_arrow_is_refused(stub, files):
    # was UNKNOWN: "Exception iterating responses: File is too small: 16"
    dataset_dir = files["root"] / "not-arrow"
    reply = stream(stub.ReadShards, pb.ReadShardsRequest(dataset_dir=str(dataset_dir)), timeout=30)
    refused(reply, grpc.StatusCode.FAILED_PRECONDITION,
            f"dataset_dir: {dataset_dir / 'shard-00000.arrow'}: not an Arrow IPC file (")


def test_a_model_whose_tokenizer_cannot_load_fails_the_preparation_naming_model(stub, files):
    # was FAILED with "internal error: TypeError('transformers.configuration_utils.PreTrainedConfig() argument
    # after ** must be a mapping, not list')", error_code 13 (INTERNAL)
    root = files["root"]
    request = pb.PrepareDatasetRequest(arguments=pb.PrepareArguments(
        model=str(root / "bad-model"), dataset=[str(root / "good.jsonl")], output_dir=str(root / "out" / "a")))
    final = finish(stub, stub.PrepareDataset(request, timeout=30).preparation.id)
    assert final.state == S.PREPARATION_STATE_FAILED
    assert final.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert final.error.startswith(f"model: {root / 'bad-model'}: cannot load its tokenizer: "), final.error


def test_unusable_paths_in_the_arguments_are_invalid_arguments(stub, files):
    # was UNKNOWN: "Exception calling application: embedded null byte" (output_dir='\x00')
    good = str(files["root"] / "good.jsonl")
    for arguments, message in (
            (pb.PrepareArguments(dataset=[good], output_dir="\x00"), "output_dir: '\\x00' contains a NUL byte at offset 0"),
            (pb.PrepareArguments(dataset=[good, "x" * 300], output_dir="out"), "dataset: 'xxxxxxxx"),
            (pb.PrepareArguments(dataset=[good], output_dir="out", model="a/" * 2100), "model: 'a/a/")):
        reply = unary(stub.PrepareDataset, pb.PrepareDatasetRequest(arguments=arguments))
        refused(reply, grpc.StatusCode.INVALID_ARGUMENT, message)
