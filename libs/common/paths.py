"""Path arguments from callers: the checks every edge runs on a string naming a file or
directory before the filesystem sees it. A NUL byte makes Python's os calls raise ValueError,
a name longer than the system allows makes them raise OSError (ENAMETOOLONG) and `~user` of
no such user makes expanduser raise RuntimeError: each would otherwise surface as an internal
error far from the argument that caused it."""

from __future__ import annotations

import os
import pathlib

from libs.common.errors import InvalidArgument, NotFound

# The system's limits (Linux: 4096 and 255 bytes); pathconf may not know them elsewhere.
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096
NAME_MAX = os.pathconf("/", "PC_NAME_MAX") if hasattr(os, "pathconf") else 255


def problem(value: str) -> str | None:
    """Why `value` cannot name a file on this system, or None when it can."""
    if "\x00" in value:
        return f"contains a NUL byte at offset {value.index(chr(0))}"
    encoded = os.fsencode(value)
    if len(encoded) >= PATH_MAX:
        return f"is {len(encoded)} bytes long; paths on this system must be shorter than {PATH_MAX}"
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return (f"has a {len(longest)}-byte name ({os.fsdecode(longest[:24])}...); names on this system "
                f"are at most {NAME_MAX} bytes")
    return None


def argument(value: str, field: str) -> pathlib.Path:
    """`value` as a path, or InvalidArgument naming `field`."""
    found = problem(value)
    if found:
        raise InvalidArgument(f"{_shown(value)} {found}", field=field)
    return pathlib.Path(value)


def expand_user(path: str | os.PathLike[str], field: str) -> pathlib.Path:
    """`path` with a leading `~` or `~user` expanded; NotFound naming `field` when there is no
    such user (nothing can exist under a home directory that does not)."""
    try:
        return pathlib.Path(path).expanduser()
    except RuntimeError:
        user = str(path)[1:].split("/", 1)[0]
        raise NotFound(f"{_shown(str(path))}: ~{user} names the home of user {user!r}, who does not exist",
                       field=field) from None


def problems(values: dict[str, str | list[str] | None]) -> list[str]:
    """`field: problem` for every unusable path among `values` (field -> path, or a list of them)."""
    found = []
    for field, given in values.items():
        for value in [given] if isinstance(given, str) else (given or []):
            why = problem(value)
            if why:
                found.append(f"{field}: {_shown(value)} {why}")
    return found


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:80] + "...")
