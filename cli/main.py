"""The `tuneforge` console script: dispatches subcommands to their modules.

Each subcommand is `module:function` taking the remaining argv and returning an
exit code; modules are imported only when their command runs, so `--help`
stays fast. User errors (TuneForgeError) print one line per problem and exit 2;
a traceback means a bug in TuneForge.
"""

from __future__ import annotations

import importlib
import sys

from libs.common.errors import Problems, TuneForgeError

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cli.demo:main", "run the whole path: data -> dataprep -> trainer -> serving -> OpenAI client"),
    "serve": ("cli.serve:main", "start one service: serve dataprep|trainer|serving [flags]"),
    "model": ("libs.default_model.cli:main", "the embedded default model: model build-default --output_dir DIR"),
    "prepare": ("services.dataprep.cli:main", "prepare a dataset into Arrow shards (through the dataprep service)"),
    "sft": ("cli.train:main", "supervised fine-tuning (lora, qlora or full) through the trainer service, from raw or prepared data"),
    "rlhf": ("cli.train:rlhf_main", "preference and reward training (dpo, kto, orpo, simpo, cpo, rm) through the trainer service"),
    "pt": ("cli.train:pt_main", "continued pre-training (no chat template, every token trained) through the trainer service"),
    "deploy": ("services.serving.cli:main", "serve a base model and LoRA adapters behind an OpenAI-compatible API"),
    "infer": ("services.serving.infer:main", "batch inference over a dataset file with the base model or a LoRA adapter"),
    "health": ("cli.health:main", "ask a service's gRPC health endpoint: health HOST:PORT (exit 0 when SERVING)"),
    "export": ("services.trainer.export:main", "merge a LoRA adapter into its base model: export --adapters DIR --merge_lora true"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tuneforge <command> [flags]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_target, text) in COMMANDS.items()]
    lines += ["", "Run `tuneforge <command> --help` for a command's flags."]
    return "\n".join(lines)


def report(command: str, exc: TuneForgeError) -> None:
    problems = exc.problems if isinstance(exc, Problems) else [str(exc)]
    for problem in problems:
        print(f"tuneforge {command}: error: {problem}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"tuneforge: error: unknown command {command!r}{hint}; `tuneforge --help` lists them", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[command][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except TuneForgeError as exc:
        report(command, exc)
        return 2
    except KeyboardInterrupt:
        print(f"tuneforge {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
