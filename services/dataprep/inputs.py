"""Dataset arguments to raw rows: files (.jsonl, .json array, .csv, .parquet, .txt;
.jsonl and .txt also compressed, .gz or .zst, decompressed as they are read),
directories and globs of them, and ms-swift's `path#N` seeded sampling. Every
row comes out with its file and line (1-based; for .json, .csv and .parquet the
1-based row, or the CSV line the row starts on; for a whole .txt file, 1) and
its raw text for rejects. A .txt document is the row {"text": ...}."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import pathlib
import random
import sys
import zlib
from typing import BinaryIO, Iterator

from libs.common.errors import InvalidArgument, NotFound

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Compressed files, decompressed as they stream: only line-oriented types, whose rows
# need no seeking back. zstd through pyarrow's codec, which raises on a truncated stream;
# python-zstandard's stream_reader ends one silently (a file cut 100 bytes short gave
# 184,394 of its 200,000 lines and no error), which would train on part of a file unsaid.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
COMPRESSED = (".jsonl", ".txt")
_MAGIC = {".gz": b"\x1f\x8b", ".zst": b"\x28\xb5\x2f\xfd"}
TXT_MODES = ("file", "line")  # --txt_mode: a .txt file is one document, or each non-blank line is one
_GLOB_CHARS = ("*", "?", "[")
ACCEPTED = f"{', '.join(SUFFIXES)}, or {'/'.join(COMPRESSED)} compressed ({', '.join(COMPRESSIONS)})"


@dataclasses.dataclass
class Source:
    """A dataset file being read; `sha256` and `rows` are complete once read."""

    path: str
    sha256: str = ""
    rows: int = 0


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One `--dataset` argument: the files it names and, for `path#N`, how many rows to take."""

    spec: str
    sources: tuple[Source, ...]
    sample: int | None = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One raw row: a decoded value (any JSON type) or, when the text is not JSON, `error`.
    A JSON Lines row holds its undecoded bytes (`data`) until decoded() is called where
    the row is tokenized: a --num_proc worker, not the process reading the file."""

    file: str
    line: int
    raw: str
    value: object = None
    error: str | None = None
    data: bytes | None = None
    reason: str | None = None  # why `error` (a reject reason); None: the text is not JSON
    # No string of `value` can hold a lone surrogate: JSON bytes json.loads reads as UTF-8 decode
    # to one only from a \u escape or the bytes ED A0-BF (UTF-8-like surrogates, which it lets
    # through), and they have neither; False: unknown, formats.to_example looks at every string.
    surrogate_free: bool = False

    def decoded(self) -> Record:
        if self.data is None:
            return self
        data = self.data
        text = data.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            return Record(self.file, self.line, text, json.loads(data),
                          surrogate_free=b"\\u" not in data and b"\xed" not in data
                          and json.detect_encoding(data).startswith("utf-8"))
        except (ValueError, RecursionError) as exc:
            return Record(self.file, self.line, text, error=f"not a JSON object: {unreadable(exc)}")


def unreadable(exc: ValueError | RecursionError) -> str:
    """Why json.loads refused a text, in one line: its own syntax errors (with their
    place), and valid JSON that Python does not read: deeper than its recursion
    allows, or an integer longer than it converts (sys.get_int_max_str_digits())."""
    if isinstance(exc, RecursionError):
        return f"nested more deeply than the JSON reader allows (about {sys.getrecursionlimit()} levels)"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return str(exc)
    return f"an integer of more than {sys.get_int_max_str_digits()} digits"


def split_sample(spec: str) -> tuple[str, int | None]:
    """`data.jsonl#500` -> ("data.jsonl", 500); a name that exists as given keeps its `#`."""
    path, sep, count = spec.rpartition("#")
    if sep and path and count.isdigit() and not pathlib.Path(spec).exists():
        return path, int(count)
    return spec, None


def file_type(path: str) -> tuple[str, str | None] | None:
    """(the type's suffix, the compression's suffix or None) of a dataset file's name;
    None when it is not a dataset file type: `a.txt.gz` -> (".txt", ".gz")."""
    name = pathlib.PurePath(path)
    if name.suffix in COMPRESSIONS:
        inner = pathlib.PurePath(name.stem).suffix
        return (inner, name.suffix) if inner in COMPRESSED else None
    return (name.suffix, None) if name.suffix in SUFFIXES else None


def _files(pattern: str) -> list[str]:
    path = pathlib.Path(pattern)
    if path.is_file():
        return [pattern]
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and file_type(str(p)))
        if not found:
            raise InvalidArgument(f"{pattern}: directory holds no dataset files ({ACCEPTED})", field="dataset")
        return found
    if any(c in pattern for c in _GLOB_CHARS):
        found = sorted(p for p in glob.glob(pattern, recursive=True) if pathlib.Path(p).is_file())
        if not found:
            raise NotFound(f"no file matches {pattern}", field="dataset")
        return found
    raise NotFound(f"no such file: {pattern}", field="dataset")


def _check_type(path: str) -> None:
    kind = file_type(path)
    if kind is None:
        raise InvalidArgument(f"{path}: not a dataset file type; expected one of {ACCEPTED}", field="dataset")
    suffix, compression = kind
    if compression is not None:
        with open(path, "rb") as f:
            magic = f.read(4)
        if not magic.startswith(_MAGIC[compression]):
            raise InvalidArgument(f"{path}: not a {COMPRESSIONS[compression]} file (it does not start with "
                                  f"the {COMPRESSIONS[compression]} magic bytes)", field="dataset")
    if suffix != ".parquet":
        with _open(path) as f:
            try:
                head = f.read(8192)
            except _BROKEN as exc:
                raise InvalidArgument(f"{path}:1: {_broken(exc, compression)}", field="dataset") from None
        if b"\0" in head:  # git's test for binary: text in UTF-8 has no NUL byte
            kind = {".csv": "CSV", ".json": "JSON", ".jsonl": "JSON Lines", ".txt": "text"}[suffix]
            raise InvalidArgument(f"{path}: not a {kind} file: binary data (a NUL byte at offset {head.index(0)}"
                                  f"{' once decompressed' if compression else ''}); expected UTF-8 text",
                                  field="dataset")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path).close()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidArgument(f"{path}: not a Parquet file: {exc}", field="dataset") from None


# What a decompressor raises on a broken stream: gzip's EOFError (truncated), BadGzipFile
# (an OSError) and zlib.error (corrupt data); pyarrow's zstd stream an OSError.
_BROKEN = (OSError, EOFError, zlib.error)


def _broken(exc: BaseException, compression: str | None) -> str:
    what = f"a broken {COMPRESSIONS[compression]} stream" if compression else "unreadable"
    return f"{what}: {exc}" if str(exc) else f"{what}: {type(exc).__name__}"


@contextlib.contextmanager
def _open(path: str) -> Iterator[BinaryIO]:
    """A dataset file's bytes, decompressed as they are read when the name says so."""
    compression = (file_type(path) or ("", None))[1]
    if compression == ".gz":
        with gzip.open(path, "rb") as f:
            yield f
    elif compression == ".zst":
        import pyarrow as pa

        with pa.OSFile(path) as raw, io.BufferedReader(pa.CompressedInputStream(raw, "zstd")) as f:
            yield f
    else:
        with open(path, "rb") as f:
            yield f


def _lines(path: str) -> Iterator[bytes]:
    """A file's lines (compressed: as decompressed), one at a time; a broken compressed
    stream fails naming the file and the line it broke on (InvalidArgument)."""
    compression = (file_type(path) or ("", None))[1]
    number = 0
    with _open(path) as f:
        try:
            for number, line in enumerate(f, start=1):
                yield line
        except _BROKEN as exc:
            raise InvalidArgument(f"{path}:{number + 1}: {_broken(exc, compression)} (the {number} lines before "
                                  f"it were read)", field="dataset") from None


def resolve(specs: list[str]) -> list[Dataset]:
    """Checks every `--dataset` argument before any work: missing files and globs that
    match nothing are named together (NotFound), then wrong types (InvalidArgument)."""
    datasets, missing = [], []
    for spec in specs:
        pattern, sample = split_sample(spec)
        if sample == 0:
            raise InvalidArgument(f"{spec}: #N must sample at least one row", field="dataset")
        try:
            files = _files(pattern)
        except NotFound as exc:
            missing.append(exc.message)
            continue
        datasets.append(Dataset(spec, tuple(Source(f) for f in files), sample))
    if missing:
        raise NotFound("; ".join(missing), field="dataset")
    for dataset in datasets:
        for source in dataset.sources:
            _check_type(source.path)
    return datasets


def _jsonl(path: str, lines: Iterator[bytes]) -> Iterator[Record]:
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        yield Record(path, number, "", data=raw)


JSON_CHUNK = 1 << 20  # characters of a .json array read at a time
_NUMBER_CHARS = frozenset("0123456789.eE+-")


class _ArrayText:
    """The text of a .json file read in chunks: a window `text[pos:]` that grows
    on demand (`more`) and drops what was consumed."""

    def __init__(self, f):
        self.f, self.text, self.pos, self.eof = f, "", 0, False

    def more(self) -> bool:
        if self.eof:
            return False
        chunk = self.f.read(JSON_CHUNK)
        self.text = self.text[self.pos:] + chunk
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def skip_space(self) -> str:
        """The next non-whitespace character ("" at the end), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]


def _json_array(path: str, text: _ArrayText) -> Iterator[Record]:
    """The rows of a JSON array, one at a time (never the whole array in memory)."""
    decoder = json.JSONDecoder()

    def bad(what: str) -> InvalidArgument:
        return InvalidArgument(f"{path}: not a JSON array: {what}", field="dataset")

    text.pos += 1  # the "["
    number = 0
    if text.skip_space() == "]":
        text.pos += 1
    else:
        while True:
            while True:  # decode one value, reading more while it is cut off by the window's end
                try:
                    value, end = decoder.raw_decode(text.text, text.pos)
                except json.JSONDecodeError as exc:
                    if text.more():
                        continue
                    raise bad(f"{exc.msg} in row {number + 1}") from None
                except (ValueError, RecursionError) as exc:  # valid JSON Python cannot read: where it ends is unknown
                    raise bad(f"row {number + 1}: {unreadable(exc)}") from None
                cut = end == len(text.text) or (isinstance(value, (int, float)) and text.text[end] in _NUMBER_CHARS)
                if not cut or not text.more():  # a number at the window's end may go on after it
                    break
            raw, text.pos = text.text[text.pos:end], end  # the row as written (no JSON writer re-nests it)
            number += 1
            yield Record(path, number, raw, value)
            after = text.skip_space()
            text.pos += 1
            if after == "]":
                break
            if after != ",":
                raise bad(f"expected ',' or ']' after row {number}, got {after!r}" if after
                          else f"unterminated array after row {number}")
            text.skip_space()
    if text.skip_space():
        raise bad("extra data after the array")


def _json(path: str) -> Iterator[Record]:
    """A .json file: a JSON array, streamed row by row; a file that does not start
    with `[` is JSON Lines (HF datasets reads those from .json files too; so do we)."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # as json.loads(bytes), a UTF-8 BOM is skipped
        text = _ArrayText(f)
        try:
            if text.skip_space() != "[":
                with open(path, "rb") as lines:
                    yield from _jsonl(path, lines)
                return
            yield from _json_array(path, text)
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{path}: not a JSON array: not UTF-8: {exc}", field="dataset") from None


def _text_record(path: str, line: int, data: bytes) -> Record:
    """One .txt document: the row {"text": ...}, or a reject (invalid_text) naming the line
    of its first byte that is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line + data.count(b"\n", 0, exc.start)
        shown = data.decode("utf-8", errors="replace")
        return Record(path, line, shown, error=f"not UTF-8 text: byte 0x{data[exc.start]:02x} at line {at} "
                                                f"({exc.reason})", reason="invalid_text")
    return Record(path, line, text, {"text": text})


def _txt(path: str, mode: str) -> Iterator[Record]:
    """A .txt file: one document (mode file; a blank file is none), or one per
    non-blank line, its line ending not part of it (mode line; streamed)."""
    if mode == "line":
        for number, raw in enumerate(_lines(path), start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is not text
                raw = raw[3:]
            if raw.strip():
                yield _text_record(path, number, raw.rstrip(b"\r\n"))
        return
    data = b"".join(_lines(path))  # the document is one row, so it is held whole
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.strip():
        yield _text_record(path, 1, data)


def _csv(path: str) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        start = 2  # the header is line 1
        for row in reader:
            line, start = start, reader.line_num + 1
            raw = json.dumps(row, ensure_ascii=False)
            if None in row:
                yield Record(path, line, raw, error=f"{len(reader.fieldnames or [])} columns in the header, "
                                                   f"more in this row")
                continue
            # an empty cell is a missing value, as in HF datasets' CSV loader
            yield Record(path, line, raw, {k: (v if v != "" else None) for k, v in row.items()})


def _parquet(path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    number = 0
    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches():
            for value in batch.to_pylist():
                number += 1
                yield Record(path, number, json.dumps(value, ensure_ascii=False, default=str), value)


def _read_file(source: Source, txt_mode: str = "file") -> Iterator[Record]:
    suffix, _compression = file_type(source.path)
    if suffix == ".jsonl":
        yield from _counted(source, _jsonl(source.path, _lines(source.path)))
    elif suffix == ".txt":
        yield from _counted(source, _txt(source.path, txt_mode))
    else:
        reader = {".json": _json, ".csv": _csv, ".parquet": _parquet}[suffix]
        yield from _counted(source, reader(source.path))
    digest = hashlib.sha256()
    with open(source.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    source.sha256 = digest.hexdigest()


def _counted(source: Source, records: Iterator[Record]) -> Iterator[Record]:
    for record in records:
        source.rows += 1
        yield record


def sample_indices(total: int, count: int, seed: int) -> list[int]:
    """ms-swift's `#N`: N <= total takes N distinct rows; N > total takes every row
    N // total times and a sample of the rest. Seeded; kept in file order per pass."""
    rng = random.Random(seed)
    whole, rest = divmod(count, total)
    return [i for _ in range(whole) for i in range(total)] + sorted(rng.sample(range(total), rest))


def _passes(dataset: Dataset, txt_mode: str) -> Iterator[Record]:
    """One pass over a dataset's rows; a source's `rows` counts this pass only."""
    for source in dataset.sources:
        source.rows = 0
        yield from _read_file(source, txt_mode)


def read(datasets: list[Dataset], seed: int, decode: bool = True, txt_mode: str = "file") -> Iterator[Record]:
    """Every row of every dataset in argument order; blank lines are not rows.
    A sampled dataset is read more than once, never held: a first pass counts its
    rows (its size decides the sample), then every row N // size times, then a
    pass yields the sampled rest. decode=False leaves JSON Lines rows undecoded
    (Record.decoded), for the process that tokenizes them to decode. `txt_mode`:
    a .txt file is one document (file) or one per line (line)."""
    records = _rows(datasets, seed, txt_mode)
    return map(Record.decoded, records) if decode else records


def _rows(datasets: list[Dataset], seed: int, txt_mode: str) -> Iterator[Record]:
    for dataset in datasets:
        if dataset.sample is None:
            for source in dataset.sources:
                yield from _read_file(source, txt_mode)
            continue
        total = sum(1 for _ in _passes(dataset, txt_mode))
        if not total:
            raise InvalidArgument(f"{dataset.spec}: no rows to sample from", field="dataset")
        whole, rest = divmod(dataset.sample, total)
        for _ in range(whole):
            yield from _passes(dataset, txt_mode)
        if rest:
            chosen = set(sample_indices(total, rest, seed))  # the same draw as sample_indices(total, sample)
            for index, record in enumerate(_passes(dataset, txt_mode)):
                if index in chosen:
                    yield record
