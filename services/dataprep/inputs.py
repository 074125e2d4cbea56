"""Dataset arguments to raw rows: files (.jsonl, .json array, .csv, .parquet),
directories and globs of them, and ms-swift's `path#N` seeded sampling. Every
row comes out with its file and line (1-based; for .json, .csv and .parquet the
1-based row, or the CSV line the row starts on) and its raw text for rejects."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import pathlib
import random
import sys
from typing import Iterator

from libs.common.errors import InvalidArgument, NotFound

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_GLOB_CHARS = ("*", "?", "[")


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

    def decoded(self) -> Record:
        if self.data is None:
            return self
        text = self.data.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            return Record(self.file, self.line, text, json.loads(self.data))
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


def _files(pattern: str) -> list[str]:
    path = pathlib.Path(pattern)
    if path.is_file():
        return [pattern]
    if path.is_dir():
        found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not found:
            raise InvalidArgument(f"{pattern}: directory holds no dataset files ({', '.join(SUFFIXES)})",
                                  field="dataset")
        return found
    if any(c in pattern for c in _GLOB_CHARS):
        found = sorted(p for p in glob.glob(pattern, recursive=True) if pathlib.Path(p).is_file())
        if not found:
            raise NotFound(f"no file matches {pattern}", field="dataset")
        return found
    raise NotFound(f"no such file: {pattern}", field="dataset")


def _check_type(path: str) -> None:
    suffix = pathlib.Path(path).suffix
    if suffix not in SUFFIXES:
        raise InvalidArgument(f"{path}: not a dataset file type; expected one of {', '.join(SUFFIXES)}",
                              field="dataset")
    if suffix != ".parquet":
        with open(path, "rb") as f:
            head = f.read(8192)
        if b"\0" in head:  # git's test for binary: text in UTF-8 has no NUL byte
            kind = {".csv": "CSV", ".json": "JSON", ".jsonl": "JSON Lines"}[suffix]
            raise InvalidArgument(f"{path}: not a {kind} file: binary data (a NUL byte at offset {head.index(0)}); "
                                  f"expected UTF-8 text", field="dataset")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path).close()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InvalidArgument(f"{path}: not a Parquet file: {exc}", field="dataset") from None


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


def _read_file(source: Source) -> Iterator[Record]:
    suffix = pathlib.Path(source.path).suffix
    if suffix == ".jsonl":
        with open(source.path, "rb") as f:
            records = _jsonl(source.path, f)
            yield from _counted(source, records)
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


def _passes(dataset: Dataset) -> Iterator[Record]:
    """One pass over a dataset's rows; a source's `rows` counts this pass only."""
    for source in dataset.sources:
        source.rows = 0
        yield from _read_file(source)


def read(datasets: list[Dataset], seed: int, decode: bool = True) -> Iterator[Record]:
    """Every row of every dataset in argument order; blank lines are not rows.
    A sampled dataset is read more than once, never held: a first pass counts its
    rows (its size decides the sample), then every row N // size times, then a
    pass yields the sampled rest. decode=False leaves JSON Lines rows undecoded
    (Record.decoded), for the process that tokenizes them to decode."""
    records = _rows(datasets, seed)
    return map(Record.decoded, records) if decode else records


def _rows(datasets: list[Dataset], seed: int) -> Iterator[Record]:
    for dataset in datasets:
        if dataset.sample is None:
            for source in dataset.sources:
                yield from _read_file(source)
            continue
        total = sum(1 for _ in _passes(dataset))
        if not total:
            raise InvalidArgument(f"{dataset.spec}: no rows to sample from", field="dataset")
        whole, rest = divmod(dataset.sample, total)
        for _ in range(whole):
            yield from _passes(dataset)
        if rest:
            chosen = set(sample_indices(total, rest, seed))  # the same draw as sample_indices(total, sample)
            for index, record in enumerate(_passes(dataset)):
                if index in chosen:
                    yield record
