"""The flag names of ms-swift's older (1.x/2.x) examples (and run_clm's `--tokenizer_name_or_path`),
read as today's: `--sft_type lora` becomes `--train_type lora` with a one-line notice, so a command
line copied from those docs runs after renaming the program.

An alias applies to a command whose config has the field it stands for; giving an alias and
its new name with different values is an error naming both. Values that meant something
else then are translated (`ALL` -> `all-linear`, `bf16` -> `bfloat16`) or refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class Refused(ValueError):
    """A legacy value with no meaning here; its message says what to give instead."""


def _same(values: list[str]) -> list[str] | None:
    return values


def _quantization_bit(values: list[str]) -> list[str] | None:
    return None if values == ["0"] else values  # 0 was 1.x's default: no quantization


_MODULE_KEYWORDS = {"ALL": "all-linear"}


def _target_modules(values: list[str]) -> list[str] | None:
    unknown = [v for v in values if v.upper() in ("DEFAULT", "AUTO", "EMBEDDING")]
    if unknown:
        raise Refused(f"{' '.join(unknown)} chose modules per model type in ms-swift 1.x; give ALL (all-linear) "
                      f"or the module names (e.g. q_proj k_proj v_proj)")
    translated = [_MODULE_KEYWORDS.get(v.upper(), v) for v in values]
    if "all-linear" in translated and len(translated) > 1:
        raise Refused("ALL cannot be combined with module names")
    return translated


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype(values: list[str]) -> list[str] | None:
    if len(values) == 1 and values[0].upper() == "AUTO":
        return None  # 1.x's default: here the training default (float32) stays
    if len(values) != 1 or values[0].lower() not in _DTYPES:
        raise Refused(f"expected one of bf16, fp16, fp32 or AUTO; got {' '.join(values)}")
    return [_DTYPES[values[0].lower()]]


def _sample(values: list[str]) -> list[str] | None:
    if len(values) != 1 or not values[0].lstrip("-").isdigit():
        raise Refused(f"expected a number of rows; got {' '.join(values)}")
    count = int(values[0])
    if count == 0 or count < -1:
        raise Refused(f"expected at least 1 row, or -1 for all; got {count}")
    return None if count == -1 else [str(count)]


@dataclass(frozen=True)
class Alias:
    old: str
    new: str
    convert: Callable[[list[str]], list[str] | None] = _same  # None: as if not given
    meaning: str = ""

    def __post_init__(self) -> None:
        if not self.meaning:
            object.__setattr__(self, "meaning", f"ms-swift 1.x's name for --{self.new}")


ALIASES = {alias.old: alias for alias in (
    Alias("sft_type", "train_type"),
    Alias("quantization_bit", "quant_bits", _quantization_bit),
    Alias("lora_target_modules", "target_modules", _target_modules),
    Alias("lora_dropout_p", "lora_dropout"),
    Alias("dtype", "torch_dtype", _dtype),
    Alias("dataset_test_ratio", "split_dataset_ratio"),
    Alias("ckpt_dir", "adapters"),
    Alias("merge_lora_and_save", "merge_lora"),
    Alias("batch_size", "per_device_train_batch_size"),
    Alias("deepspeed_config_path", "deepspeed"),
    # no new name: ms-swift 3 writes it into the dataset argument (FILE#N); see translate()
    Alias("train_dataset_sample", "dataset", _sample, "ms-swift 1.x's: N rows of --dataset"),
    Alias("tokenizer_name_or_path", "tokenizer", meaning="run_clm's name for --tokenizer"),
)}


def _segments(argv: list[str]) -> list[tuple[str | None, list[str]]]:
    """argv as (flag name or None for leading values, its values); `--name=value` split."""
    segments: list[tuple[str | None, list[str]]] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name, sep, value = token[2:].partition("=")
            segments.append((name, [value] if sep else []))
        elif segments:
            segments[-1][1].append(token)
        else:
            segments.append((None, [token]))
    return segments


def translate(argv: list[str], fields: set[str]) -> tuple[list[str], list[str], list[str]]:
    """(argv with the aliases of `fields` renamed, one notice per alias used, problems).
    Aliases of fields the command lacks are left for its parser to name as unknown."""
    segments = _segments(argv)
    given = {name: values for name, values in segments if name is not None}
    out: list[tuple[str | None, list[str]]] = []
    notices, problems, sample = [], [], None
    for name, values in segments:
        alias = ALIASES.get(name) if name is not None else None
        if alias is None or alias.new not in fields or name in fields:
            out.append((name, values))
            continue
        try:
            converted = alias.convert(values)
        except Refused as exc:
            problems.append(f"--{alias.old} ({alias.meaning}): {exc}")
            continue
        if alias.old == "train_dataset_sample":
            sample = converted
            notices.append(f"--{alias.old} is ms-swift 1.x's; read as --dataset FILE#{values[0]} "
                           f"(ms-swift 3's form)" if converted else f"--{alias.old} -1: every row, as 1.x")
            continue
        shown = " ".join(converted) if converted is not None else "unset (the default)"
        notices.append(f"--{alias.old} is {alias.meaning}: read as --{alias.new} {shown}")
        if alias.new in given:
            if converted != given[alias.new]:
                problems.append(f"--{alias.old} {' '.join(values)} and --{alias.new} {' '.join(given[alias.new])} "
                                f"disagree (--{alias.old} is {alias.meaning}); give one")
            continue
        if converted is not None:
            out.append((alias.new, converted))
    if sample:
        out = _sampled(out, sample[0], problems)
    out = _qlora(out, notices)
    return [token for name, values in out for token in ([f"--{name}"] if name else []) + values], notices, problems


def _sampled(segments, count: str, problems: list[str]):
    """--train_dataset_sample N: 1.x drew N rows of the training data at random (seeded);
    here the one dataset becomes FILE#N, which dataprep samples seeded by --data_seed."""
    datasets = [values for name, values in segments if name == "dataset"]
    files = datasets[-1] if datasets else []
    if len(files) != 1 or "#" in files[0]:
        problems.append(f"--train_dataset_sample: samples one dataset; got --dataset {' '.join(files) or '(none)'}; "
                        f"with several, give each its own FILE#N (ms-swift 3's form)")
        return segments
    return [(name, [f"{files[0]}#{count}"] if name == "dataset" else values) for name, values in segments]


def _qlora(segments, notices: list[str]):
    """1.x's QLoRA was `--sft_type lora --quantization_bit 4`; here it is --train_type qlora."""
    names = {name: values for name, values in segments if name is not None}
    if names.get("quant_bits") != ["4"] or names.get("train_type") != ["lora"] or not any(
            notice.startswith("--quantization_bit") for notice in notices):
        return segments
    notices.append("--sft_type lora --quantization_bit 4 was ms-swift 1.x's QLoRA: read as --train_type qlora")
    return [(name, ["qlora"] if name == "train_type" else values) for name, values in segments]
