"""The adapter registry without an inference engine: validation refusals on real
adapter directories, and the bookkeeping vLLM cannot show from outside (atomic
swap, a replaced version removed from the engine only after its last request,
idempotent reloads, failed loads). The engine here records the registry's
add/remove calls; the real-vLLM path is covered by test_serving_admin.py."""

from __future__ import annotations

import asyncio
import gc
import json
import pathlib
import time

import pytest
from prometheus_client import REGISTRY

from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.serving.adapters import AdapterRegistry, State


@pytest.fixture
def base(tmp_path) -> pathlib.Path:
    (tmp_path / "base").mkdir()
    return tmp_path / "base"


@pytest.fixture
def engine(recording_engine):
    return recording_engine()


@pytest.fixture
def registry(engine, base) -> AdapterRegistry:
    return AdapterRegistry(engine, base, "base-model", max_lora_rank=16)


# -- validation --------------------------------------------------------------------------


def test_a_valid_adapter_passes_validation(registry, base, tmp_path, publish_adapter):
    info = registry.validate("ada", publish_adapter(tmp_path / "run" / "checkpoint-3", base))
    assert (info.rank, info.has_manifest, info.path.name) == (8, True, "checkpoint-3")


def test_validation_refusals_carry_their_codes_and_fields(registry, base, tmp_path, publish_adapter):
    good = publish_adapter(tmp_path / "good", base)
    cases = {
        "missing path": (lambda: registry.validate("a", tmp_path / "missing"), NotFound, "path"),
        "no adapter in dir": (lambda: registry.validate("a", base), NotFound, "path"),
        "empty name": (lambda: registry.validate("", good), InvalidArgument, "name"),
        "spaces": (lambda: registry.validate("my adapter", good), InvalidArgument, "name"),
        "base name": (lambda: registry.validate("base-model", good), InvalidArgument, "name"),
        "rank": (lambda: registry.validate("a", publish_adapter(tmp_path / "r32", base, rank=32)),
                 FailedPrecondition, "path"),
        "modules_to_save": (lambda: registry.validate("a", publish_adapter(tmp_path / "m", base, modules_to_save=["lm_head"])),
                            FailedPrecondition, "path"),
        "other base": (lambda: registry.validate("a", publish_adapter(tmp_path / "o", tmp_path)),
                       FailedPrecondition, "path"),
    }
    for case, (call, error, field) in cases.items():
        with pytest.raises(error) as info:
            call()
        assert info.value.field == field, case


def test_a_tampered_file_fails_the_manifest_check(registry, base, tmp_path, publish_adapter):
    adapter = publish_adapter(tmp_path / "a", base)
    (adapter / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(FailedPrecondition) as info:
        registry.validate("a", adapter)
    assert "adapter_model.safetensors: sha256 does not match manifest.json" in info.value.message


def test_the_optimizer_state_is_not_what_serving_verifies(registry, base, tmp_path):
    """Only a resume reads trainer_state.json and training_state.pt: serving does not hash them
    (they are twice the adapter), a resume still does; every file serving reads is checked."""
    from libs.common import checkpoint

    def fill(tmp):
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
        (tmp / "adapter_model.safetensors").write_bytes(b"w1")
        (tmp / "args.json").write_text(json.dumps({"model": str(base)}))
        (tmp / "trainer_state.json").write_text("{}")
        (tmp / "training_state.pt").write_bytes(b"optimizer")

    adapter = checkpoint.publish(tmp_path / "run" / "checkpoint-2", fill)
    (adapter / "training_state.pt").write_bytes(b"torn")
    registry.validate("a", adapter)
    with pytest.raises(FailedPrecondition, match="training_state.pt: sha256 does not match"):
        checkpoint.verify(adapter)
    (adapter / "args.json").write_text('{"model": "elsewhere"}')
    with pytest.raises(FailedPrecondition, match="args.json: sha256 does not match"):
        registry.validate("a", adapter)


def test_base_paths_compare_after_resolving_symlinks(registry, base, tmp_path, publish_adapter):
    (tmp_path / "link").symlink_to(base)
    registry.validate("a", publish_adapter(tmp_path / "a", tmp_path / "link"))


def test_adapter_root_refuses_dotdot_and_symlink_escapes(engine, base, tmp_path, publish_adapter):
    root = tmp_path / "adapters"
    inside = publish_adapter(root / "run" / "checkpoint-1", base)
    outside = publish_adapter(tmp_path / "elsewhere", base)
    registry = AdapterRegistry(engine, base, "base-model", max_lora_rank=16, adapter_root=root)
    assert registry.validate("a", inside).path == inside.resolve()
    assert registry.validate("a", "run").path == inside.resolve()  # relative: inside the root; a run: its newest
    (root / "link").symlink_to(outside)
    (root / "run" / "checkpoint-1" / "stolen").symlink_to(tmp_path / "elsewhere" / "adapter_model.safetensors")
    refusals = {
        "dotdot": (root / "run" / ".." / ".." / "elsewhere", "contains `..`"),
        "relative dotdot": ("../elsewhere", "contains `..`"),
        "outside": (outside, "outside the adapter root"),
        "symlinked dir": (root / "link", "outside the adapter root"),
        "symlinked file": (inside, "stolen in"),
    }
    for case, (path, words) in refusals.items():
        with pytest.raises(InvalidArgument) as info:
            registry.validate("a", path)
        assert info.value.field == "path", case
        assert words in info.value.message, (case, info.value.message)
    # Without a root, an adapter may live anywhere.
    AdapterRegistry(engine, base, "base-model", max_lora_rank=16).validate("a", outside)


# -- loading, swapping, unloading -------------------------------------------------------


def test_swap_keeps_the_old_version_until_its_last_request_ends(
        registry, engine, base, tmp_path, publish_adapter):
    old = publish_adapter(tmp_path / "run" / "checkpoint-1", base, weights=b"one")
    new = publish_adapter(tmp_path / "run" / "checkpoint-2", base, weights=b"two")

    async def scenario():
        await registry.load("ada", old)
        running = registry.lease("ada")  # a request still generating on the old checkpoint
        view = await registry.load("ada", new)
        assert view.state is State.READY and view.path == str(new)
        with registry.lease("ada") as fresh:
            assert fresh.lora.lora_path == str(new)  # new requests switch at once
        assert running.lora.lora_path == str(old)
        assert engine.paths() == [str(old), str(new)]  # old kept for the running request
        running.release()
        await asyncio.sleep(0)  # the removal runs as a task on the loop
        await asyncio.sleep(0)
        assert engine.paths() == [str(new)]

    asyncio.run(scenario())


def test_a_lease_dropped_without_release_is_released_by_the_garbage_collector(
        registry, engine, base, tmp_path, publish_adapter):
    old = publish_adapter(tmp_path / "a1", base, weights=b"one")
    new = publish_adapter(tmp_path / "a2", base, weights=b"two")

    async def scenario():
        await registry.load("ada", old)
        registry.lease("ada")  # never released: a stream whose client vanished before it started
        gc.collect()
        await registry.load("ada", new)
        for _ in range(3):
            await asyncio.sleep(0)
        assert engine.paths() == [str(new)]

    asyncio.run(scenario())


def test_reload_if_changed_skips_the_same_checkpoint_but_not_a_republished_one(
        registry, engine, base, tmp_path, publish_adapter):
    path = tmp_path / "run" / "checkpoint-5"
    publish_adapter(path, base, weights=b"one")

    async def scenario():
        first = await registry.load("ada", path)
        again = await registry.load("ada", path, if_changed=True)
        assert again == first and engine.next_id == 1
        publish_adapter(path, base, weights=b"two")  # the same path, new weights
        await registry.load("ada", path, if_changed=True)
        assert engine.next_id == 2
        await registry.load("ada", path)  # an explicit load always loads
        assert engine.next_id == 3
        await asyncio.sleep(0)
        assert len(engine.loaded) == 1

    asyncio.run(scenario())


def test_failed_loads(registry, engine, base, tmp_path, publish_adapter):
    good = publish_adapter(tmp_path / "good", base, weights=b"one")
    newer = publish_adapter(tmp_path / "newer", base, weights=b"two")

    async def scenario():
        engine.fail_with = "unsupported layer"
        with pytest.raises(FailedPrecondition):
            await registry.load("fresh", good)
        (view,) = registry.list()
        assert (view.state, view.error) == (State.FAILED, "unsupported layer")
        with pytest.raises(NotFound):
            registry.lease("fresh")
        assert registry.servable() == []

        engine.fail_with = None
        await registry.load("ada", good)
        engine.fail_with = "disk error"
        with pytest.raises(FailedPrecondition):
            await registry.load("ada", newer)
        ada = {v.name: v for v in registry.list()}["ada"]
        # Still serving the older checkpoint, with the failure on record.
        assert (ada.state, ada.path) == (State.READY, str(good))
        assert "disk error" in ada.error
        with registry.lease("ada") as lease:
            assert lease.lora.lora_path == str(good)

    asyncio.run(scenario())


def part_counts() -> dict[str, float]:
    value = REGISTRY.get_sample_value
    counts = {part: value("tuneforge_serving_adapter_load_part_seconds_count", {"part": part})
              for part in ("delivery", "verification", "registration", "first_request")}
    return {**counts, "delivery_sum": value("tuneforge_serving_adapter_load_part_seconds_sum", {"part": "delivery"})}


def test_a_load_observes_its_parts_and_runs_a_first_request_before_it_serves(
        registry, engine, base, tmp_path, publish_adapter):
    """verification, registration and first_request once per load that happened; delivery only
    for a trainer's live publication (published_at); a load skipped as unchanged, none."""
    old = publish_adapter(tmp_path / "run" / "checkpoint-1", base, weights=b"one")
    new = publish_adapter(tmp_path / "run" / "checkpoint-2", base, weights=b"two")

    async def scenario():
        before = part_counts()
        await registry.load("ada", old)
        assert engine.first_requests == ["ada@1"]
        after_admin = part_counts()
        await registry.load("ada", new, if_changed=True, published_at=time.time() - 0.25)
        await registry.load("ada", new, if_changed=True, published_at=time.time())  # unchanged: skipped
        after_followed = part_counts()
        return before, after_admin, after_followed

    before, after_admin, after_followed = asyncio.run(scenario())
    parts = ("delivery", "verification", "registration", "first_request")
    assert {p: after_admin[p] - before[p] for p in parts} == {
        "delivery": 0, "verification": 1, "registration": 1, "first_request": 1}
    assert {p: after_followed[p] - after_admin[p] for p in parts} == {
        "delivery": 1, "verification": 1, "registration": 1, "first_request": 1}
    assert engine.first_requests == ["ada@1", "ada@2"]
    # the delivery observed is the time from the publication to the load: at least the quarter second
    assert 0.25 <= after_followed["delivery_sum"] - after_admin["delivery_sum"] < 30


def test_an_adapter_whose_first_request_fails_is_refused_and_leaves_the_engine(
        registry, engine, base, tmp_path, publish_adapter):
    good = publish_adapter(tmp_path / "good", base, weights=b"one")
    broken = publish_adapter(tmp_path / "broken", base, weights=b"two")

    async def scenario():
        await registry.load("ada", good)
        engine.fail_first_request_with = "the engine loaded it but could not run it: shape mismatch"
        with pytest.raises(FailedPrecondition, match="shape mismatch"):
            await registry.load("ada", broken)
        ada = {v.name: v for v in registry.list()}["ada"]
        assert (ada.state, ada.path) == (State.READY, str(good))  # still serving the one that ran
        assert f"loading {broken} failed" in ada.error
        assert engine.paths() == [str(good)]  # the refused version left the engine
        with registry.lease("ada") as lease:
            assert lease.lora.lora_path == str(good)

    asyncio.run(scenario())


def test_unload(registry, engine, base, tmp_path, publish_adapter):
    adapter = publish_adapter(tmp_path / "a", base)

    async def scenario():
        await registry.load("ada", adapter)
        view = await registry.unload("ada")
        assert view.name == "ada"
        await asyncio.sleep(0)
        assert engine.loaded == {}
        with pytest.raises(NotFound):
            registry.lease("ada")
        with pytest.raises(NotFound) as info:
            await registry.unload("ada")
        assert info.value.field == "name"
        with registry.lease("base-model") as lease:
            assert lease.lora is None

    asyncio.run(scenario())


def test_startup_adapters_are_checked_before_the_engine_starts(base, tmp_path, publish_adapter):
    from libs.common.errors import Problems
    from services.serving.server import check_adapters

    registry = AdapterRegistry(None, base, "base-model", max_lora_rank=16)
    good = publish_adapter(tmp_path / "good", base)
    check_adapters(registry, {"good": str(good)})
    with pytest.raises(Problems) as info:
        check_adapters(registry, {"good": str(good), "gone": str(tmp_path / "gone"),
                                  "wide": str(publish_adapter(tmp_path / "wide", base, rank=64))})
    assert [p.split(":")[:2] for p in info.value.problems] == [["adapters", " gone"], ["adapters", " wide"]]

    async def load_without_engine():
        await registry.load("good", good)

    with pytest.raises(Unavailable):
        asyncio.run(load_without_engine())


def test_a_pushed_adapter_with_modules_to_save_names_the_commands_without_this_servers_directory(registry, base):
    """The pushed files' directory is this server's and gone after the call: the commands name
    placeholders for the caller's own copy, never that directory."""
    files = {"adapter_config.json": json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(base), "modules_to_save": ["lm_head"]}).encode(),
        "adapter_model.safetensors": b"w"}
    before = REGISTRY.get_sample_value("tuneforge_serving_adapter_refusals_total", {"reason": "modules_to_save"})
    with pytest.raises(FailedPrecondition) as info:
        asyncio.run(registry.push("headed", files))
    assert (info.value.field, info.value.message) == ("files", (
        "the pushed adapter is not served: it sets modules_to_save (lm_head), whole modules that vLLM cannot apply as "
        "LoRA deltas to the served base model. Serve it merged, as a model of its own: tuneforge export --adapters "
        "ADAPTER_DIR --merge_lora true --output_dir MERGED_DIR && tuneforge deploy --model MERGED_DIR"))
    assert REGISTRY.get_sample_value("tuneforge_serving_adapter_refusals_total",
                                     {"reason": "modules_to_save"}) == before + 1
    assert registry.list() == []  # a caller's refusal is the caller's to see, not ListAdapters'
