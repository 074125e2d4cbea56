"""The adapter registry: which LoRA adapters this server has, validating and
loading them into the engine, swapping a name to a newer checkpoint atomically,
and removing a replaced version from the engine once its last request is done.

Everything but `validate` runs on the engine's asyncio loop; other threads call
in with `asyncio.run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from libs.common import adapter_dir, checkpoint, disk, logs, paths, tempdirs
from libs.common.errors import FailedPrecondition, InvalidArgument, NotFound, TuneForgeError, Unavailable
from libs.common.vllm_platform import lora_slot_rank
from services.serving import metrics
from services.serving.config import NAME
from services.serving.scratch import PREFIX

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

LOG = logging.getLogger("tuneforge.serving.adapters")


class State(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Unservable(FailedPrecondition):
    """An adapter vLLM cannot serve as a LoRA, but its merged export can (`reason`: modules_to_save or
    resized_vocabulary, a label of metrics.ADAPTER_REFUSALS)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, field="path")
        self.reason = reason
        metrics.ADAPTER_REFUSALS.labels(reason=reason).inc()


def _refused(reason: str, message: str) -> FailedPrecondition:
    metrics.ADAPTER_REFUSALS.labels(reason=reason).inc()
    return FailedPrecondition(message, field="path")


def _saved_vocabulary_rows(path: pathlib.Path) -> int | None:
    """Rows of the embed_tokens/lm_head saved whole in adapter_model.safetensors, read from its
    header only (8 bytes of length, then JSON); None when there are none or the file is not one."""
    try:
        with open(path / "adapter_model.safetensors", "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= 100 << 20:
                return None
            header = json.loads(file.read(size))
    except (OSError, ValueError):
        return None
    rows = [entry["shape"][0] for key, entry in header.items() if isinstance(entry, dict) and entry.get("shape")
            and ("embed_tokens" in key or "lm_head" in key) and len(entry["shape"]) == 2]
    return max(rows) if rows else None


class LoraEngine(Protocol):
    async def add_lora(self, name: str, path: pathlib.Path) -> "LoRARequest": ...

    async def first_request(self, lora: "LoRARequest") -> None: ...

    async def remove_lora(self, lora: "LoRARequest") -> None: ...


@dataclass
class Version:
    """One load of an adapter: what requests run with, and how many still do."""

    lora: "LoRARequest"
    path: pathlib.Path
    fingerprint: str | None
    inflight: int = 0
    retired: bool = False


@dataclass(frozen=True)
class AdapterView:
    """An adapter as ListAdapters and /v1/models show it."""

    name: str
    path: str  # the checkpoint being served, or being loaded while LOADING
    state: State
    error: str = ""  # why the last load failed (FAILED; or READY still serving the older checkpoint)
    base_model: str = ""
    rank: int = 0
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # unix time the served version became ready


@dataclass
class _Entry:
    view: AdapterView
    version: Version | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    refusal: str = ""  # why a followed checkpoint is not served (`refused`), told to requests naming it


def check_name(name: str, base_name: str) -> None:
    if not name:
        raise InvalidArgument("must not be empty", field="name")
    if not NAME.match(name):
        raise InvalidArgument(f"{name!r} is not a valid adapter name (letters, digits and ._:/@+- , "
                              "starting with a letter or digit, at most 128)", field="name")
    if name == base_name:
        raise InvalidArgument(f"{name!r} is the base model's name", field="name")


def _fingerprint(info: adapter_dir.AdapterDir) -> str | None:
    """The manifest's digest: equal fingerprints at the same path mean the same weights."""
    if not info.has_manifest:
        return None
    return hashlib.sha256((info.path / checkpoint.MANIFEST).read_bytes()).hexdigest()


class Lease:
    """A request's hold on a model: keeps a replaced adapter version in the engine
    until the request ends. Release it exactly once (`with`, or `release()`); a
    lease dropped without release is released when it is garbage collected."""

    def __init__(self, registry: "AdapterRegistry", version: Version | None):
        self.lora = version.lora if version else None
        self._finalizer = None
        if version is not None:
            version.inflight += 1
            self._finalizer = weakref.finalize(self, registry._release_threadsafe, version)
            self._finalizer.atexit = False

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class AdapterRegistry:
    """`engine` may be attached after construction: the server validates its startup
    adapters first, so a bad flag fails in a second instead of after the engine's start."""

    def __init__(self, engine: LoraEngine | None, base_model: pathlib.Path, base_name: str, max_lora_rank: int,
                 adapter_root: str | pathlib.Path | None = None):
        self.engine = engine
        # Resolved once: a symlink swapped later under the root's own path changes nothing.
        self.adapter_root = _realpath(adapter_root) if adapter_root is not None else None
        self.base_model = pathlib.Path(base_model).resolve()
        self.base_name = base_name
        self.max_lora_rank = max_lora_rank
        self._entries: dict[str, _Entry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._removals: set[asyncio.Task] = set()
        metrics.MODELS.add(base_name)

    # -- validation (no engine, any thread) -------------------------------------------------

    def validate(self, name: str, path: str | pathlib.Path) -> adapter_dir.AdapterDir:
        """Every check that needs no engine, in the order a user fixes them."""
        check_name(name, self.base_name)
        if not str(path):
            raise InvalidArgument("must not be empty", field="path")
        path = self._within_root(paths.expand_user(paths.argument(str(path), "path"), "path"))
        info = adapter_dir.inspect(path, field="path")
        self._check_contained(info.path)
        return self._check_adapter(info)

    def validate_pushed(self, name: str, path: pathlib.Path) -> adapter_dir.AdapterDir:
        """The checks of `validate` on a pushed adapter's files (written by this server, so
        the adapter root does not apply)."""
        check_name(name, self.base_name)
        return self._check_adapter(adapter_dir.inspect(path, field="files"), pushed=True)

    def _check_adapter(self, info: adapter_dir.AdapterDir, pushed: bool = False) -> adapter_dir.AdapterDir:
        """What the adapter itself must be: intact, on this base model, within the rank, LoRA only.
        Each refusal is counted by reason (metrics.ADAPTER_REFUSALS)."""
        if info.has_manifest:
            # FailedPrecondition naming the file whose sha256 differs. Only a resume reads the
            # optimizer state, twice the adapter's size: hashing it too made this about 4x slower
            # (13-16 against 3-4 ms on the demo's checkpoint, best of 5-7 runs on a loaded machine).
            try:
                checkpoint.verify(info.path, skip=checkpoint.RESUME_STATE)
            except FailedPrecondition:
                metrics.ADAPTER_REFUSALS.labels(reason="integrity").inc()
                raise
        if info.base_model is None:
            raise _refused("no_base_model", f"{info.path} records no base model (no `model` in args.json, no "
                           "base_model_name_or_path in adapter_config.json)")
        trained_on = adapter_dir.normalize(info.base_model)
        if trained_on != self.base_model:
            raise _refused("base_model", f"{info.path} was trained on {trained_on}, but this server serves "
                           f"{self.base_model}")
        if info.rank > self.max_lora_rank:
            raise _refused("rank", f"{info.path} has LoRA rank {info.rank}, above this server's --max_lora_rank "
                           f"{self.max_lora_rank}; restart with --max_lora_rank {lora_slot_rank(info.rank)}")
        if info.modules_to_save:
            raise self._unservable(info, pushed)
        return info

    def _unservable(self, info: adapter_dir.AdapterDir, pushed: bool) -> "Unservable":
        """modules_to_save: vLLM applies LoRA deltas to one base model's weights; whole modules (and a
        vocabulary resized with them) exist only in a merged model, which needs its own server
        (one engine serves one base model: services.serving.engine)."""
        rows, base_rows = _saved_vocabulary_rows(info.path), self._base_vocabulary()
        resized = rows is not None and base_rows is not None and rows != base_rows
        why = (f"its embed_tokens/lm_head have {rows} rows, a vocabulary resized from this base's {base_rows} "
               "tokens (--tokenizer), and " if resized else "")
        # A pushed adapter's directory is this server's, gone after the call: the caller has the files.
        checkpoint_dir, merged = ("ADAPTER_DIR", "MERGED_DIR") if pushed else (info.path, f"{info.path}-merged")
        return Unservable(
            "resized_vocabulary" if resized else "modules_to_save",
            f"{info.path} is not served: {why}it sets modules_to_save ({', '.join(info.modules_to_save)}), whole "
            f"modules that vLLM cannot apply as LoRA deltas to the served base model. Serve it merged, as a model "
            f"of its own: tuneforge export --adapters {checkpoint_dir} --merge_lora true --output_dir {merged} && "
            f"tuneforge deploy --model {merged}")

    def _base_vocabulary(self) -> int | None:
        try:
            return int(json.loads((self.base_model / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _within_root(self, path: str | pathlib.Path) -> pathlib.Path:
        """With an adapter root: a relative path is taken inside it, `..` is refused, and
        the path must resolve (symlinks followed) inside the root."""
        path = pathlib.Path(path).expanduser()
        if self.adapter_root is None:
            return path
        if ".." in path.parts:
            raise InvalidArgument(f"{path} contains `..`; give a path inside the adapter root {self.adapter_root}",
                                  field="path")
        if not path.is_absolute():
            path = self.adapter_root / path
        self._inside(path, path)
        return path

    def _check_contained(self, adapter: pathlib.Path) -> None:
        """The adapter directory (a run directory's newest checkpoint) and every file in it
        must resolve inside the root: a symlinked weights file must not read elsewhere."""
        if self.adapter_root is None:
            return
        self._inside(adapter, adapter)
        for file in sorted(adapter.rglob("*")):
            self._inside(file, adapter)

    def _inside(self, path: pathlib.Path, shown: pathlib.Path) -> None:
        resolved = _realpath(path)
        if resolved != self.adapter_root and self.adapter_root not in resolved.parents:
            what = shown if path == shown else f"{path.relative_to(shown)} in {shown}"
            raise InvalidArgument(f"{what} resolves to {resolved}, outside the adapter root {self.adapter_root} "
                                  "(symlinks are followed)", field="path")

    # -- loop-side operations ---------------------------------------------------------------

    async def push(self, name: str, files: dict[str, bytes]) -> AdapterView:
        """Loads an adapter from its files' bytes, as `load` does from a path: validated the
        same way, replacing a served version of `name` atomically. The files are written to
        a directory of this process, held by the engine (its own links) and then removed; the
        view's path is the engine's copy. Pushing the files `name` serves already changes
        nothing (each rank of a job may push the same policy)."""
        check_name(name, self.base_name)
        check_pushed_files(files)
        digest = hashlib.sha256()
        for file in sorted(files):
            digest.update(hashlib.sha256(file.encode()).digest() + hashlib.sha256(files[file]).digest())
        directory = await asyncio.to_thread(_write_pushed, files)
        try:
            return await self.load(name, directory, pushed=f"pushed:{digest.hexdigest()}")
        except TuneForgeError as exc:
            if exc.field == "path":  # the engine's refusal of the files, not of a path the caller gave
                exc.field = "files"
            # The caller never saw this process's directory: name what it sent instead.
            for shown in {str(directory.resolve()), str(directory)}:
                exc.message = exc.message.replace(shown, "the pushed adapter")
            exc.args = (exc.message,)
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, directory, True)

    async def load(self, name: str, path: str | pathlib.Path, if_changed: bool = False,
                   pushed: str | None = None, published_at: float | None = None) -> AdapterView:
        """Validates, loads and makes `name` serve `path`. An existing name keeps serving
        its older checkpoint until the new one is ready, then new requests switch to it.
        With `if_changed`, a name already serving the same checkpoint is left alone.
        `pushed`: `path` holds files pushed by `push`, whose digest this is (see there).
        `published_at`: the unix time a trainer published `path` (a live event); its
        delivery, from then to this call, is observed with the load's other parts."""
        self._loop = asyncio.get_running_loop()
        if self.engine is None:
            raise Unavailable("the inference engine is still starting")
        # Clocks of two machines may disagree: a publication "after" its receipt was delivered at once.
        delivery = None if published_at is None else max(0.0, time.time() - published_at)
        started = time.perf_counter()
        try:
            info, fingerprint = await asyncio.to_thread(self._verify, name, path, pushed)
        except TuneForgeError:
            metrics.ADAPTER_LOADS.labels(result="refused").inc()
            raise
        verification = time.perf_counter() - started
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(AdapterView(name=name, path=str(info.path), state=State.LOADING))
        async with entry.lock:
            if self._entries.get(name) is not entry:  # unloaded while we waited: start over as new
                return await self.load(name, path, if_changed, pushed, published_at)
            served = entry.version
            if (if_changed and served is not None and served.path == info.path
                    and fingerprint is not None and served.fingerprint == fingerprint):
                return entry.view
            if pushed and served is not None and served.fingerprint == pushed:
                return entry.view
            entry.view = replace(entry.view, path=str(info.path), state=State.LOADING, error="")
            entry.refusal = ""
            try:
                registering = time.perf_counter()
                lora = await self.engine.add_lora(name, info.path)
                warming = time.perf_counter()
                await self._first_request(lora, info.path)
                warmed = time.perf_counter()
            except TuneForgeError as exc:
                metrics.ADAPTER_LOADS.labels(result="failed").inc()
                if served is None:
                    entry.view = replace(entry.view, state=State.FAILED, error=exc.message)
                else:
                    entry.view = replace(entry.view, path=str(served.path), state=State.READY,
                                         error=f"loading {info.path} failed: {exc.message}")
                logs.log(LOG, logging.WARNING, "adapter load failed", adapter=name, path=str(info.path),
                         error=exc.message)
                raise
            seconds = time.perf_counter() - started
            # A pushed adapter's files are gone after this call; the engine's copy is what serves.
            served_path = pathlib.Path(lora.lora_path) if pushed else info.path
            entry.version = Version(lora, served_path, fingerprint)
            entry.view = AdapterView(
                name=name, path=str(served_path), state=State.READY, base_model=str(self.base_model),
                rank=info.rank, load_seconds=seconds, loaded_at=time.time())
            if served is not None:
                self._retire(served)
        metrics.ADAPTER_LOADS.labels(result="ok").inc()
        metrics.ADAPTER_LOAD_DURATION.observe(seconds)
        if delivery is not None:
            metrics.ADAPTER_LOAD_PARTS.labels(part="delivery").observe(delivery)
        metrics.ADAPTER_LOAD_PARTS.labels(part="verification").observe(verification)
        metrics.ADAPTER_LOAD_PARTS.labels(part="registration").observe(warming - registering)
        metrics.ADAPTER_LOAD_PARTS.labels(part="first_request").observe(warmed - warming)
        metrics.MODELS.add(name)
        self._count_ready()
        logs.log(LOG, logging.INFO, "adapter ready", adapter=name, path=str(served_path), rank=info.rank,
                 seconds=round(seconds, 4), replaced=str(served.path) if served else None,
                 delivery_seconds=None if delivery is None else round(delivery, 4),
                 verification_seconds=round(verification, 4), registration_seconds=round(warming - registering, 4),
                 first_request_seconds=round(warmed - warming, 4))
        return entry.view

    def _verify(self, name: str, path: str | pathlib.Path,
                pushed: str | None) -> tuple[adapter_dir.AdapterDir, str | None]:
        """The adapter checked (`validate`, or `validate_pushed` for pushed files) and its fingerprint."""
        if pushed:
            return self.validate_pushed(name, path), pushed
        info = self.validate(name, path)
        return info, _fingerprint(info)

    async def _first_request(self, lora: "LoRARequest", path: pathlib.Path) -> None:
        """The new version's first request, before any client's: whatever vLLM does on an
        adapter's first use is paid here, while requests still run on the older version, and
        an adapter the engine takes but cannot run is refused instead of served. A refused
        one leaves the engine."""
        try:
            await self.engine.first_request(lora)
        except BaseException as exc:
            await asyncio.shield(self.engine.remove_lora(lora))
            if isinstance(exc, TuneForgeError) or not isinstance(exc, Exception):
                raise
            raise FailedPrecondition(f"the engine loaded {path} but could not run it: {exc}", field="path") from exc

    async def unload(self, name: str) -> AdapterView:
        """Removes `name`: new requests get NOT_FOUND; running ones finish on it."""
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"no adapter named {name!r}", field="name")
        async with entry.lock:
            if self._entries.get(name) is not entry:
                raise NotFound(f"no adapter named {name!r}", field="name")
            del self._entries[name]
            metrics.MODELS.remove(name)
            if entry.version is not None:
                self._retire(entry.version)
        self._count_ready()
        logs.log(LOG, logging.INFO, "adapter unloaded", adapter=name, path=entry.view.path)
        return entry.view

    async def refused(self, name: str, path: str, message: str) -> AdapterView:
        """Records why a followed checkpoint is not served, for ListAdapters and for requests naming
        `name`: a name serving nothing becomes FAILED with `message`; one serving an older
        checkpoint keeps serving it, with `message` as its error."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry(AdapterView(name=name, path=str(path), state=State.FAILED,
                                                             error=message), refusal=message)
            return entry.view
        async with entry.lock:
            entry.refusal = message
            if entry.version is None:
                entry.view = replace(entry.view, path=str(path), state=State.FAILED, error=message)
            else:
                entry.view = replace(entry.view, error=message)
        return entry.view

    def list(self) -> list[AdapterView]:
        return [entry.view for entry in self._entries.values()]

    def servable(self) -> list[AdapterView]:
        """Adapters requests can use, each with the checkpoint it serves now (while a newer
        one is LOADING, requests still run on the older)."""
        return [replace(entry.view, path=str(entry.version.path))
                for entry in self._entries.values() if entry.version is not None]

    def lease(self, model: str) -> Lease:
        """Pins what `model` (the base name or an adapter name) serves right now, for one request."""
        self._loop = self._loop or asyncio.get_running_loop()
        if model == self.base_name:
            return Lease(self, None)
        entry = self._entries.get(model)
        if entry is not None and entry.version is None and entry.refusal:
            raise NotFound(f"The model `{model}` is not served: {entry.refusal}", field="model")
        if entry is None or entry.version is None:
            raise NotFound(f"The model `{model}` does not exist.", field="model")
        return Lease(self, entry.version)

    # -- retiring replaced versions ---------------------------------------------------------

    def _retire(self, version: Version) -> None:
        version.retired = True
        if version.inflight == 0:
            self._remove(version)

    def _release_threadsafe(self, version: Version) -> None:
        # Called by Lease.release on the loop, or by the garbage collector on any thread.
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._release(version)
        else:
            loop.call_soon_threadsafe(self._release, version)

    def _release(self, version: Version) -> None:
        version.inflight -= 1
        if version.retired and version.inflight == 0:
            self._remove(version)

    def _remove(self, version: Version) -> None:
        task = asyncio.get_running_loop().create_task(self.engine.remove_lora(version.lora))
        self._removals.add(task)
        task.add_done_callback(self._removed)

    def _removed(self, task: asyncio.Task) -> None:
        self._removals.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The engine evicts adapters by itself when its cache is full; a failed removal costs memory only.
            logs.log(LOG, logging.WARNING, "removing a replaced adapter version failed", error=str(task.exception()))

    def _count_ready(self) -> None:
        metrics.ADAPTERS_READY.set(sum(1 for entry in self._entries.values() if entry.version is not None))


# What PEFT's save_pretrained (and ms-swift's args.json) put in an adapter directory.
PUSHED_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "args.json", "README.md")


def check_pushed_files(files: dict[str, bytes]) -> None:
    """A pushed adapter is a flat set of PEFT's files, with its config and weights."""
    unknown = sorted(set(files) - set(PUSHED_FILES))
    if unknown:
        raise InvalidArgument(f"{unknown[0]!r} is not a file of a PEFT adapter; expected some of "
                              f"{', '.join(PUSHED_FILES)}", field="files")
    if adapter_dir.ADAPTER_CONFIG not in files:
        raise InvalidArgument(f"no {adapter_dir.ADAPTER_CONFIG} among the files", field="files")
    if not {"adapter_model.safetensors", "adapter_model.bin"} & set(files):
        raise InvalidArgument("no weights (adapter_model.safetensors or adapter_model.bin) among the files",
                              field="files")


def _write_pushed(files: dict[str, bytes]) -> pathlib.Path:
    # Named like the engine's scratch, so a server killed midway has it removed at its next start.
    directory = pathlib.Path(tempdirs.make(PREFIX))
    try:
        with disk.writing(directory, context="writing a pushed adapter's files"):
            for name, content in files.items():
                (directory / name).write_bytes(content)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory


def _realpath(path: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(pathlib.Path(path).expanduser()))


