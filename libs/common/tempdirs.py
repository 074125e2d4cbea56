"""Temporary directories named after the process that owns them (`<prefix><pid>-<random>`), so a
later start removes those whose process died without removing its own (SIGKILL)."""

from __future__ import annotations

import os
import shutil
import tempfile


def make(prefix: str, root: str | os.PathLike | None = None) -> str:
    """A new directory for this process, under `root` (default: the temporary directory)."""
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)


def remove_stale(prefix: str, root: str | os.PathLike | None = None) -> list[str]:
    """Removes the `prefix` directories under `root` whose process is gone; returns their paths.
    A directory whose pid runs (or was reused) stays, as does one not named after a pid."""
    root = os.fspath(root or tempfile.gettempdir())
    removed = []
    for entry in os.scandir(root):
        parts = entry.name[len(prefix):].split("-", 1)
        if not (entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False)
                and len(parts) == 2 and parts[0].isdigit()):
            continue
        try:
            os.kill(int(parts[0]), 0)
            continue  # still running (or the pid was reused: removed by a later start)
        except ProcessLookupError:
            pass
        except PermissionError:  # another user's live process
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed
