"""What a LoRA adapter directory says about itself (base model, rank,
modules_to_save), read from args.json and PEFT's adapter_config.json."""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

from libs.common import checkpoint, paths
from libs.common.errors import FailedPrecondition, NotFound

ARGS = "args.json"
ADAPTER_CONFIG = "adapter_config.json"
# args.json written with `"model": null` means "trained on the embedded default model".
DEFAULT_MODEL = "<embedded default model>"


@dataclass(frozen=True)
class AdapterDir:
    path: pathlib.Path  # the adapter directory itself (a run directory resolves to its newest checkpoint)
    base_model: str | None  # as recorded: args.json `model`, else adapter_config.json base_model_name_or_path
    rank: int  # the largest rank of any module (r, or a rank_pattern entry)
    modules_to_save: tuple[str, ...]
    has_manifest: bool


def _read_json(path: pathlib.Path, field: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FailedPrecondition(f"{path} is not readable JSON: {exc}", field=field) from exc
    if not isinstance(data, dict):
        raise FailedPrecondition(f"{path} must hold a JSON object", field=field)
    return data


def inspect(path: str | pathlib.Path, field: str = "path") -> AdapterDir:
    """Reads an adapter (or run) directory. NotFound if it is not there or holds no
    adapter; FailedPrecondition if its metadata is unreadable."""
    path = paths.expand_user(paths.argument(str(path), field), field)
    if not path.exists():
        raise NotFound(f"{path} does not exist", field=field)
    try:
        resolved = checkpoint.resolve_adapter_dir(path)
    except NotFound as exc:
        raise NotFound(exc.message, field=field) from exc
    config = _read_json(resolved / ADAPTER_CONFIG, field)
    base: str | None = None
    if (resolved / ARGS).is_file():
        args = _read_json(resolved / ARGS, field)
        if "model" in args:
            base = DEFAULT_MODEL if args["model"] in (None, "") else str(args["model"])
    if base is None and config.get("base_model_name_or_path"):
        base = str(config["base_model_name_or_path"])
    if base is not None and base != DEFAULT_MODEL:
        _check_recorded_base(base, resolved, field)
    rank_pattern = config.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        raise FailedPrecondition(f"{resolved / ADAPTER_CONFIG}: rank_pattern must be an object (module pattern -> "
                                 "rank)", field=field)
    ranks = [config.get("r", 0), *rank_pattern.values()]
    try:
        rank = max(int(r) for r in ranks)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: JSON's 1e999 is an infinity
        raise FailedPrecondition(f"{resolved / ADAPTER_CONFIG}: r and rank_pattern must be integers", field=field) from exc
    modules_to_save = config.get("modules_to_save") or []
    if not isinstance(modules_to_save, list) or not all(isinstance(m, str) for m in modules_to_save):
        raise FailedPrecondition(f"{resolved / ADAPTER_CONFIG}: modules_to_save must be a list of module names",
                                 field=field)
    return AdapterDir(
        path=resolved.resolve(),
        base_model=base,
        rank=rank,
        modules_to_save=tuple(modules_to_save),
        has_manifest=(resolved / checkpoint.MANIFEST).is_file(),
    )


def _check_recorded_base(base: str, adapter: pathlib.Path, field: str) -> None:
    """The recorded base model must be a path `normalize` can take: it is metadata, so a
    bad one is the adapter's problem (FailedPrecondition), not the caller's argument."""
    why = paths.problem(base)
    if why is None:
        try:
            pathlib.Path(base).expanduser()
        except RuntimeError:
            why = "names the home directory of a user who does not exist"
    if why:
        shown = base if len(base) <= 80 else base[:80] + "..."
        raise FailedPrecondition(f"{adapter}: the base model it records, {shown!r}, {why}", field=field)


def normalize(base_model: str) -> pathlib.Path:
    """A recorded base model as an absolute path without symlinks, so two spellings
    of the same directory compare equal."""
    if base_model == DEFAULT_MODEL:
        from libs.default_model.resolve import resolve_model

        return resolve_model(None).resolve()
    return pathlib.Path(os.path.realpath(pathlib.Path(base_model).expanduser()))
