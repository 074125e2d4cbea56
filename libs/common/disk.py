"""What a full disk looks like to a writer, and turning it into DiskFull where the write happens.

A full file system (ENOSPC), a spent quota (EDQUOT) and a file past a size limit (EFBIG, also
what RLIMIT_FSIZE gives; Python ignores SIGXFSZ, so the write fails instead of the process
dying) are the same fault to a user: there is no room for this file. Python's own writes raise
OSError with the errno; native writers do not: torch's file writer raises RuntimeError with the
OSError of a Python file object as its context (none at all when given a path), and
safetensors' Rust writer only says `(os error N)` in its message.
"""

from __future__ import annotations

import contextlib
import errno
import re
from typing import Iterator

from libs.common.errors import DiskFull

FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_RUST_IO = re.compile(r"\(os error (\d+)\)")  # std::io::Error's Display


def full_errno(exc: BaseException | None) -> int | None:
    """The disk-full errno behind `exc` (it, its cause or its context), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            if exc.errno in FULL:
                return exc.errno
        elif (match := _RUST_IO.search(str(exc))) and int(match.group(1)) in FULL:
            return int(match.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def writing(path, field: str | None = None, context: str = "") -> Iterator[None]:
    """Raises DiskFull naming `path` when what runs inside fails for want of room; any other
    error passes unchanged, and so does a DiskFull raised further in (it names its own path)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        code = full_errno(exc)
        if code is None:
            raise
        raise DiskFull(path, code, field=field, context=context) from exc
