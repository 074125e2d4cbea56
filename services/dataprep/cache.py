"""Reusing a prepared dataset: the fingerprint of everything that decides its
shards (input files' bytes, resolved arguments, tokenizer and template files,
code versions), and the check that an output directory already holds exactly
that preparation, complete and intact."""

from __future__ import annotations

import hashlib
import json
import pathlib

from libs.common.errors import FailedPrecondition, NotFound
from services.dataprep import manifest as manifest_file

CODE_DIR = pathlib.Path(__file__).parent  # its .py files and built-in templates decide the tokens too
# Arguments that change where or how fast, not what: left out of the fingerprint.
NOT_CONTENT = ("output_dir", "num_proc")
# Files of a model directory that decide tokens: the tokenizer, its config and chat template.
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "chat_template", "special_tokens_map", "added_tokens", "vocab", "merges")


def file_sha256(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_files(model_dir: pathlib.Path) -> dict[str, str]:
    """name -> sha256 of the model directory's tokenizer and template files."""
    return {p.name: file_sha256(p) for p in sorted(model_dir.iterdir())
            if p.is_file() and p.name.startswith(_TOKENIZER_FILE_PREFIXES)}


def code_files() -> dict[str, str]:
    """relative path -> sha256 of dataprep's own code and data files (templates)."""
    return {str(p.relative_to(CODE_DIR)): file_sha256(p) for p in sorted(CODE_DIR.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def fingerprint(args: dict, input_files: list[str], model_dir: pathlib.Path, versions: dict[str, str]) -> str:
    """sha256 over the content-deciding arguments, each input file's bytes (in
    order), the tokenizer files, dataprep's code and the library versions."""
    content = {
        "code": code_files(),
        "args": {k: v for k, v in sorted(args.items()) if k not in NOT_CONTENT and k not in ("model", "tokenizer")},
        "inputs": [file_sha256(path) for path in input_files],
        "tokenizer": tokenizer_files(model_dir),
        "versions": versions,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def reusable(output_dir: pathlib.Path, fingerprint_: str) -> dict | None:
    """The manifest already in `output_dir` when it was made with this fingerprint
    and every shard it lists is there with its sha256; otherwise None."""
    try:
        manifest = manifest_file.read(output_dir)
    except (NotFound, FailedPrecondition):  # no directory, no manifest, a broken one: nothing to reuse
        return None
    if manifest.get("fingerprint") != fingerprint_:
        return None
    if not (output_dir / manifest.get("rejects", "rejects.jsonl")).is_file():
        return None
    for shard in manifest["shards"]:
        path = output_dir / shard["file"]
        if not path.is_file() or file_sha256(path) != shard["sha256"]:
            return None
    return manifest
