"""gRPC fuzzing support shared by the services' fuzz tests: Hypothesis strategies that build
any protobuf message from its descriptor (edge values for every scalar type, optional
presence, repeated and map fields, nested messages, oneofs, enums in and out of range), and
the checks every fuzzed reply and every server must pass afterwards."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Iterable

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

F = FieldDescriptor

_INT_BOUNDS = {
    F.TYPE_INT32: (-2**31, 2**31 - 1), F.TYPE_SINT32: (-2**31, 2**31 - 1), F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    F.TYPE_INT64: (-2**63, 2**63 - 1), F.TYPE_SINT64: (-2**63, 2**63 - 1), F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
_INT_EDGES = (0, 1, -1, 2, 3, 7, 8, 255, 256, 1000, 65535, 65536, -2**31, 2**31 - 1, 2**31, 2**32 - 1,
              -2**63, 2**63 - 1, 2**64 - 1)
_FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-4, 1.5, float("nan"), float("inf"), float("-inf"))
_FLOAT32_EDGES = _FLOAT_EDGES + (3.4028234663852886e38, -3.4028234663852886e38, 1.401298464324817e-45)
_DOUBLE_EDGES = _FLOAT_EDGES + (1.7976931348623157e308, -1.7976931348623157e308, 5e-324)

# Strings a parser or a filesystem call chokes on. No lone surrogates: a proto string is UTF-8,
# so the client refuses them before they are sent.
ODD_TEXT = (
    "", " ", "\t\n ", "\x00", "a\x00b", "\x1b[31m\x7f", "é", "日本語", "🙂🙂", "\u202eevil", "\ufeffbom", "e\u0301",
    "null", "None", "NaN", "-1", "0", "1e999", "{}", "[]", '{"a": 1}', "{", "%s%n%x", "${HOME}", "$(id)", "a;b",
    "*", "**/*", "?", "[", "a#0", "a#-1", "a#99999999999999999999",
    "x" * 300,  # a path component longer than NAME_MAX (255)
    "a/" * 2100,  # a path longer than PATH_MAX (4096)
    "é" * 60_000,  # 120 kB of text
)
# Path-like strings: relative escapes, absolute system paths of every kind (directories,
# regular files, devices, /proc), home and Windows spellings. Not "/" itself, though `paths()`
# composes it ("/..", "../../../.."): a test whose server walks a directory tree (dataprep's
# dataset argument) filters what it sends.
ODD_PATHS = (
    "..", ".", "./", "../../etc", "../../../../../../etc/passwd", "/etc", "/etc/passwd", "/etc/hostname",
    "/dev/null", "/dev/zero", "/proc/self/status", "/proc/self/fd/0", "/tmp/../etc", "/nonexistent/dir",
    "~", "~root", "~no-such-user/x", "C:\\Windows\\win.ini", "\\\\server\\share", "file:///etc/passwd",
)


def integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = _INT_BOUNDS[field_type]
    return st.one_of(st.sampled_from([v for v in _INT_EDGES if low <= v <= high]), st.integers(low, high))


def floats(double: bool) -> st.SearchStrategy[float]:
    edges = _DOUBLE_EDGES if double else _FLOAT32_EDGES
    return st.one_of(st.sampled_from(edges), st.floats(width=64 if double else 32))


def paths() -> st.SearchStrategy[str]:
    parts = st.sampled_from(["..", ".", "", "a", "etc", "é", "x" * 300, "a\x00b", "~", "*"])
    return st.one_of(st.sampled_from(ODD_PATHS), st.lists(parts, min_size=1, max_size=6).map("/".join))


def texts() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_TEXT), paths(), st.text(max_size=24))


def binaries() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from([b"", b"\x00", b"\xff" * 8, b"ARROW1\x00\x00" + b"\x00" * 16]),
                     st.binary(max_size=64))


def _scalars(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind in _INT_BOUNDS:
        return integers(kind)
    if kind in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return floats(double=kind == F.TYPE_DOUBLE)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind == F.TYPE_STRING:
        return texts()
    if kind == F.TYPE_BYTES:
        return binaries()
    if kind == F.TYPE_ENUM:
        # proto3 enums are open: a number the server's enum does not define arrives as it is
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), integers(F.TYPE_INT32))
    raise TypeError(f"{field.full_name}: no strategy for field type {kind}")


def _is_synthetic(oneof) -> bool:
    """The oneof protoc makes for a proto3 `optional` field (`_name` around that one field)."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


class _Builder:
    """Builds each field's strategy once; a message's strategy per (message, depth)."""

    def __init__(self, hints: dict[str, st.SearchStrategy], only: dict[str, st.SearchStrategy], max_depth: int,
                 max_items: int):
        self.hints = hints  # "Message.field" -> also these values (of one element)
        self.only = only  # "Message.field" -> only these values
        self.max_depth = max_depth
        self.max_items = max_items
        self._messages: dict[tuple[str, int], st.SearchStrategy] = {}

    def value(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy:
        """One value of `field` (one element of a repeated field)."""
        key = _key(field)
        generic = self.message(field.message_type, depth + 1) if field.type == F.TYPE_MESSAGE else _scalars(field)
        return st.one_of(self.hints[key], generic) if key in self.hints else generic

    def message(self, descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy:
        key = (descriptor.full_name, depth)
        if key not in self._messages:
            self._messages[key] = self._build(descriptor, depth)
        return self._messages[key]

    def _build(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy:
        cls = _message_class(descriptor)
        if depth > self.max_depth:
            return st.builds(cls)
        setters = []  # (field or oneof members, strategy of a value to set, or None to skip)
        for oneof in descriptor.oneofs:
            if not _is_synthetic(oneof):
                members = [(field, self.value(field, depth)) for field in oneof.fields]
                setters.append(st.none() | st.sampled_from(members).flatmap(
                    lambda pair: pair[1].map(lambda v, f=pair[0]: [(f, v)])))
        for field in descriptor.fields:
            if field.containing_oneof is not None and not _is_synthetic(field.containing_oneof):
                continue  # set above, at most one of its oneof
            if _key(field) in self.only:
                values = self.only[_key(field)]
                if field.has_presence:
                    values = st.none() | values
            elif field.message_type is not None and field.message_type.GetOptions().map_entry:
                entry = field.message_type.fields_by_name
                values = st.dictionaries(self.value(entry["key"], depth), self.value(entry["value"], depth),
                                         max_size=self.max_items)
            elif field.is_repeated:
                values = st.lists(self.value(field, depth), max_size=self.max_items)
            else:
                values = self.value(field, depth)
                if field.has_presence:  # unset or set: the server must tell absent from zero
                    values = st.none() | values
            setters.append(values.map(lambda v, f=field: None if v is None else [(f, v)]))

        @st.composite
        def build(draw):
            message = cls()
            for setter in setters:
                for field, value in draw(setter) or ():
                    _set(message, field, value)
            return message

        return build()


def _key(field: FieldDescriptor) -> str:
    return f"{field.containing_type.name}.{field.name}"


def _set(message, field: FieldDescriptor, value) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].type == F.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        if field.type == F.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _message_class(descriptor: Descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _known_keys(descriptor: Descriptor, seen: set[str] | None = None) -> set[str]:
    seen = set() if seen is None else seen
    if descriptor.full_name in seen:
        return set()
    seen.add(descriptor.full_name)
    keys = {f"{descriptor.name}.{field.name}" for field in descriptor.fields}
    for field in descriptor.fields:
        if field.message_type is not None:
            keys |= _known_keys(field.message_type, seen)
    return keys


def messages(message_class, hints: dict[str, st.SearchStrategy] | None = None,
             only: dict[str, st.SearchStrategy] | None = None, max_depth: int = 3,
             max_items: int = 4) -> st.SearchStrategy:
    """Any message of `message_class`. `hints` adds plausible values to a field's generic ones
    ("ReadShardsRequest.dataset_dir": real directories; for a repeated field, of one element).
    `only` replaces the field's whole value (a list for a repeated field; an optional field is
    still left unset half the time): for requests mostly valid, so they reach the code behind
    validation, and for fields whose generic values could do harm in an otherwise valid request.
    Unknown keys are an error, so a renamed field cannot silently leave its hint unused."""
    hints, only = dict(hints or {}), dict(only or {})
    unknown = (set(hints) | set(only)) - _known_keys(message_class.DESCRIPTOR)
    if unknown:
        raise KeyError(f"no such fields in {message_class.DESCRIPTOR.full_name}: {sorted(unknown)}")
    return _Builder(hints, only, max_depth, max_items).message(message_class.DESCRIPTOR)


# --- replies -----------------------------------------------------------------------------------

# What a caller may be told about its request. UNKNOWN and INTERNAL are ours to fix.
# UNAVAILABLE: a service the request names is down (SubmitJob asks the dataset's dataprep service).
PROPER = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAVAILABLE})
# Codes that say which request field is wrong; libs.common.errors puts it first: "field: message".
NAMES_A_FIELD = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                           grpc.StatusCode.UNAVAILABLE})
# A Python traceback, or an exception's repr such as ValueError('embedded null byte').
_LEAK = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*(?:Error|Exception|Exit|Interrupt)\(|<class '"
                   r"|Exception calling application|Exception iterating responses")


# request type -> reply code -> count: what the fuzzers reached since `reached` was last asked
# (printed, and asserted by the tests, so a strategy that stops reaching deep code fails).
SEEN: collections.defaultdict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def reached(request_type) -> collections.Counter:
    """The reply codes of `request_type` checked since the last call (then forgotten)."""
    counts = SEEN.pop(request_type.__name__, collections.Counter())
    print(f"{request_type.__name__}: {dict(counts.most_common())}")
    return counts


# The transport failing instead of the server's reply reaching the caller (a status message
# too large for the trailers arrives as RESOURCE_EXHAUSTED "Stream removed (received metadata
# size exceeds hard limit ...)": a proper code, but neither the real one nor the field).
_TRANSPORT = re.compile(r"Stream removed|metadata size exceeds|Socket closed|Connection reset")


@dataclass
class Reply:
    code: grpc.StatusCode | None  # None: a stream still open when the reader left
    details: str
    messages: list

    def __str__(self) -> str:
        return f"{self.code.name if self.code else 'still open'}: {self.details[:500]!r}"


def unary(method, request, timeout: float = 30.0) -> Reply:
    """Calls a unary RPC; a deadline passing is a hang, reported as DEADLINE_EXCEEDED."""
    try:
        return Reply(grpc.StatusCode.OK, "", [method(request, timeout=timeout)])
    except grpc.RpcError as error:
        return Reply(error.code(), error.details() or "", [])


def stream(method, request, timeout: float, limit: int = 16) -> Reply:
    """Reads a server stream for at most `timeout` seconds and `limit` messages, then cancels
    it, so a stream that waits for events cannot hang the test."""
    responses = method(request, timeout=timeout)
    got: list = []
    try:
        for response in responses:
            got.append(response)
            if len(got) >= limit:
                return Reply(None, "", got)
        return Reply(grpc.StatusCode.OK, "", got)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Reply(None, "", got)
        return Reply(error.code(), error.details() or "", got)
    finally:
        responses.cancel()


def field_names(descriptor: Descriptor) -> set[str]:
    """Every field name of a message and of the messages it holds (what an error may name)."""
    names = set()
    for key in _known_keys(descriptor):
        names.add(key.split(".", 1)[1])
    return names


def check(reply: Reply, request, may_stay_open: bool = False) -> None:
    """A fuzzed request's reply: a proper status code (never UNKNOWN or INTERNAL), no Python
    traceback or exception repr in its details, the field named first where the code is
    about the request ("dataset_dir: ..."), and a stream still open only where it may wait."""
    where = f"{constructor(request)} got {reply}"
    SEEN[type(request).__name__][reply.code.name if reply.code else "still open"] += 1
    if reply.code is None:
        assert may_stay_open, f"{where}: the stream neither ended nor failed within its deadline"
        return
    assert reply.code in PROPER, where
    assert not _LEAK.search(reply.details), where
    assert not _TRANSPORT.search(reply.details), f"{where}: the transport failed, the reply was lost"
    if reply.code in NAMES_A_FIELD:
        # A field, or a path to one inside the request: "sampling.n", "prompts[1].token_ids".
        named = set(re.sub(r"\[\d+\]", "", reply.details.split(":", 1)[0]).split("."))
        assert ":" in reply.details and named <= field_names(request.DESCRIPTOR), \
            f"{where}: the details do not start with a field of the request"


def constructor(message, limit: int = 2000) -> str:
    """The message as the Python expression that builds it (set fields only), to paste into a
    regression test: `ReadShardsRequest(dataset_dir='\\x00', start=Cursor(row=-1))`."""
    def render(value) -> str:
        if hasattr(value, "ListFields"):
            return constructor(value, limit=10**9)
        if isinstance(value, (list, tuple)) or type(value).__name__.startswith(("Repeated", "RepeatedScalar")):
            return "[" + ", ".join(render(v) for v in value) + "]"
        if isinstance(value, str) and len(value) > 64:
            period = next((p for p in range(1, 9) if len(value) % p == 0 and value == value[:p] * (len(value) // p)), 0)
            if period:
                return f"{value[:period]!r} * {len(value) // period}"
            if len(value) > 400:
                return f"{value[:400]!r} + ...({len(value)} chars)"
        return repr(value)

    text = f"{type(message).__name__}(" + ", ".join(
        f"{field.name}={render(value)}" for field, value in message.ListFields()) + ")"
    return text if len(text) <= limit else text[:limit] + "...)"


def assert_serving(address: str, services: Iterable[str]) -> None:
    """The server answers grpc.health.v1 Health/Check with SERVING, overall and per service."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", *services):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply)
