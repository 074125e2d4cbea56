"""The built-in chat templates `--template` names, as Jinja text the tokenizer's own
template is replaced by: ChatML, Qwen2.5's (ChatML with tools), Llama-3's, and
ms-swift's `default` for base models."""

from __future__ import annotations

import pathlib

from libs.common.errors import InvalidArgument

_HERE = pathlib.Path(__file__).parent
NAMES = ("chatml", "default", "llama3", "qwen")


def load(name: str) -> str:
    """The Jinja text of built-in template `name`; an unknown name is INVALID_ARGUMENT listing the names."""
    if name not in NAMES:
        raise InvalidArgument(f"unknown template {name!r}; built-in templates: {', '.join(NAMES)}",
                              field="template")
    return (_HERE / f"{name}.jinja").read_text(encoding="utf-8")
