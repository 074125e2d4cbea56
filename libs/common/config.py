"""Typed config: one dataclass per entrypoint, mapped one to one onto CLI flags,
JSON files and proto messages, with every problem reported at once.

A config dataclass declares fields with defaults (the only place defaults live)
and `field(metadata={"help": ..., "choices": [...]})`. It may define
`problems(self) -> list[str]` for cross-field checks. A field may itself be a config
dataclass (a training method's own config): a nested JSON object, a nested proto
message, never a flag (commands flatten what they offer as flags).

A dataclass mapped onto a proto message has a same-named proto field for every field:
`to_proto` refuses one it cannot carry rather than drop it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import pathlib
import struct
import sys
import types
import typing
from typing import Any, TypeVar

from libs.common import legacy_flags
from libs.common.errors import Problems

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Returns (element type, is_list) with Optional unwrapped."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, typing.List):
        (inner,) = typing.get_args(tp) or (str,)
        return inner, True
    return tp, False


def _convert(value: Any, tp: Any, name: str) -> Any:
    base, is_list = _base_type(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(base):
        if isinstance(value, base):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"expected an object of {', '.join(f.name for f in dataclasses.fields(base))}; "
                             f"got {value!r}")
        try:  # its own checks run with the outer config's (problems() names them), all at once
            return from_dict(base, value, check=False)
        except Problems as exc:  # unknown keys and bad values, named by their place
            raise ValueError("; ".join(exc.problems)) from None
    if is_list:
        if isinstance(value, str):
            value = [value]
        return [_convert(v, base, name) for v in value]
    if base is bool:
        return parse_bool(value)
    if base in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return base(value)
    if base is str:
        return str(value)
    return value


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolved_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], values: dict[str, Any], where: str = "", check: bool = True) -> T:
    """Builds `cls` from a mapping; unknown keys and bad values are all reported at once,
    then (check) the object's own problems()."""
    hints = _resolved_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    prefix = f"{where}: " if where else ""
    for key, value in values.items():
        if key not in fields:
            problems.append(f"{prefix}unknown argument {key!r}{_did_you_mean(key, list(fields))}")
            continue
        try:
            kwargs[key] = _convert(value, hints[key], key)
        except (TypeError, ValueError) as exc:
            problems.append(f"{prefix}{key}: {exc}")
            continue
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] is not None and kwargs[key] not in choices:
            problems.append(f"{prefix}{key}: expected one of {', '.join(map(str, choices))}; got {kwargs[key]!r}")
    if problems:
        raise Problems(problems)
    obj = cls(**kwargs)
    if check:
        validate(obj)
    return obj


def validate(obj: Any) -> None:
    check = getattr(obj, "problems", None)
    found = check() if check else []
    if found:
        raise Problems(found)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_json(obj: Any, path: str | pathlib.Path, extra: dict[str, Any] | None = None) -> None:
    data = to_dict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    if extra:
        data.update(extra)
    pathlib.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


class _ErrorCollectingParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse's own errors become Problems
        raise Problems([message])


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one `--<field>` flag per dataclass field (ms-swift style: `--lora_rank 8`,
    `--packing true`, `--dataset a.jsonl b.jsonl`). Flags default to None so that
    only what the user gave overrides the dataclass default."""
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        base, is_list = _base_type(hints[f.name])
        if f.metadata.get("cli") is False or dataclasses.is_dataclass(base):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        parser.add_argument(
            f"--{f.name}",
            dest=f.name,
            default=None,
            nargs="+" if is_list else None,
            metavar=f.name.upper(),
            help=help_text,
        )


def from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    given = {k: v for k, v in vars(namespace).items() if k in {f.name for f in dataclasses.fields(cls)} and v is not None}
    return from_dict(cls, given)


def parse(cls: type[T], argv: list[str], prog: str | None = None) -> T:
    """Parses argv into `cls`; unknown flags get a did-you-mean hint, all problems at once.
    ms-swift 1.x's flag names (libs.common.legacy_flags) are read as today's, each with a
    one-line notice on stderr."""
    known = [f.name for f in dataclasses.fields(cls)]
    argv, notices, problems = legacy_flags.translate(list(argv), set(known))
    for notice in notices:
        print(f"{prog or 'tuneforge'}: note: {notice}", file=sys.stderr)
    parser = _ErrorCollectingParser(prog=prog, add_help=True)
    add_arguments(parser, cls)
    namespace, unknown = parser.parse_known_args(argv)
    stray, after_flag = [], False
    for token in unknown:
        if token.startswith("--"):
            problems.append(f"unknown flag {token}{_did_you_mean(token.lstrip('-').split('=')[0], known)}")
            after_flag = True
        elif not after_flag:  # values following an unknown flag belong to it
            stray.append(token)
    if stray:
        problems.append(f"unexpected argument(s): {' '.join(stray)}")
    try:
        obj = from_args(cls, namespace)
    except Problems as exc:
        problems.extend(exc.problems)
        obj = None
    if problems:
        raise Problems(problems)
    return obj


def from_proto(cls: type[T], message: Any) -> T:
    """Builds `cls` from a proto message whose field names match: unset optional
    fields and empty repeated/string fields fall back to the dataclass default."""
    return from_dict(cls, _proto_values(cls, message))


def shortest_float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32: a float field of a proto
    arrives as float32, and 1e-4 should stay 1e-4 in args.json, not 9.999999747e-05."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack("<f", candidate) == packed:
                return candidate
        except OverflowError:  # rounded past float32's largest (3.4028235e38 -> 3.4e38)
            continue
    return value


def _proto_values(cls: type, message: Any) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    hints = _resolved_types(cls)
    values: dict[str, Any] = {}
    for desc in message.DESCRIPTOR.fields:
        if desc.name not in names:
            continue
        value = getattr(message, desc.name)
        if desc.type == desc.TYPE_FLOAT:
            value = [shortest_float32(v) for v in value] if desc.is_repeated else shortest_float32(value)
        if desc.message_type is not None and not desc.is_repeated:  # a nested config
            if message.HasField(desc.name):
                values[desc.name] = _proto_values(_base_type(hints[desc.name])[0], value)
        elif desc.is_repeated:
            if len(value):
                values[desc.name] = list(value)
        elif desc.has_presence:
            if message.HasField(desc.name):
                values[desc.name] = value
        elif value not in ("", 0, False):
            values[desc.name] = value
    return values


def _message_class(descriptor) -> type:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def missing_proto_fields(cls: type, message_cls: type) -> list[str]:
    """The fields of config dataclass `cls` (nested configs included, as `outer.inner`) that
    proto message `message_cls` cannot carry."""
    fields = message_cls.DESCRIPTOR.fields_by_name
    hints = _resolved_types(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            missing.append(f.name)
            continue
        base, _ = _base_type(hints[f.name])
        if dataclasses.is_dataclass(base) and fields[f.name].message_type is not None:
            nested = _message_class(fields[f.name].message_type)
            missing += [f"{f.name}.{name}" for name in missing_proto_fields(base, nested)]
    return missing


def to_proto(obj: Any, message_cls: type) -> Any:
    """Copies the dataclass fields into a new proto message of the same field names;
    raises TypeError for a field the message lacks (it would be lost on the wire)."""
    message = message_cls()
    if dataclasses.is_dataclass(obj):
        missing = missing_proto_fields(type(obj), message_cls)
        if missing:
            raise TypeError(f"{message_cls.DESCRIPTOR.full_name} has no field for {type(obj).__name__}."
                            f"{', '.join(missing)}")
    for desc in message.DESCRIPTOR.fields:
        if not hasattr(obj, desc.name):
            continue
        value = getattr(obj, desc.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            getattr(message, desc.name).CopyFrom(to_proto(value, _message_class(desc.message_type)))
        elif isinstance(value, list):
            getattr(message, desc.name).extend(value)
        else:
            setattr(message, desc.name, value)
    return message
