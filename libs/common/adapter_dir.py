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
    ranks = [config.get("r", 0), *(config.get("rank_pattern") or {}).values()]
    try:
        rank = max(int(r) for r in ranks)
    except (TypeError, ValueError) as exc:
        raise FailedPrecondition(f"{resolved / ADAPTER_CONFIG}: r and rank_pattern must be integers", field=field) from exc
    return AdapterDir(
        path=resolved.resolve(),
        base_model=base,
        rank=rank,
        modules_to_save=tuple(config.get("modules_to_save") or ()),
        has_manifest=(resolved / checkpoint.MANIFEST).is_file(),
    )


def normalize(base_model: str) -> pathlib.Path:
    """A recorded base model as an absolute path without symlinks, so two spellings
    of the same directory compare equal."""
    if base_model == DEFAULT_MODEL:
        from libs.default_model.resolve import resolve_model

        return resolve_model(None).resolve()
    return pathlib.Path(os.path.realpath(pathlib.Path(base_model).expanduser()))
