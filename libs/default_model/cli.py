"""`tuneforge model`: build the default model into a directory, or print (building if needed) the cached one."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from libs.common import logs
from libs.common.config import parse
from libs.common.errors import Problems
from libs.default_model.build import build
from libs.default_model.config import BuildConfig
from libs.default_model.resolve import default_model_dir

USAGE = """usage: tuneforge model <subcommand> [flags]

subcommands:
  build-default --output_dir DIR [--max_steps N]   build the default model into a new directory
  path                                            print the cached default model's directory (built on first use)"""


@dataclass
class BuildDefaultArgs:
    output_dir: str | None = field(default=None, metadata={"help": "new or empty directory to write the model to"})
    max_steps: int | None = field(default=None, metadata={"help": f"pre-training steps (default: {BuildConfig.max_steps})"})

    def problems(self) -> list[str]:
        found = [] if self.output_dir else ["output_dir: required (--output_dir DIR)"]
        if self.max_steps is not None and self.max_steps < 1:
            found.append(f"max_steps: must be at least 1, got {self.max_steps}")
        return found


@dataclass
class PathArgs:
    """No flags: the cached default model is fixed by the source tree."""


def build_default(argv: list[str]) -> int:
    args = parse(BuildDefaultArgs, argv, prog="tuneforge model build-default")
    config = BuildConfig() if args.max_steps is None else dataclasses.replace(BuildConfig(), max_steps=args.max_steps)
    print(build(args.output_dir, config))
    return 0


def path(argv: list[str]) -> int:
    parse(PathArgs, argv, prog="tuneforge model path")
    print(default_model_dir())
    return 0


SUBCOMMANDS = {"build-default": build_default, "path": path}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise Problems([f"unknown subcommand {name!r}{hint}; expected one of {', '.join(SUBCOMMANDS)}"])
    logs.setup("model")
    return SUBCOMMANDS[name](rest)
