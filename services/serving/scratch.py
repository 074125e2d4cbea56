"""The serving process's scratch directory (`tuneforge-serving-<pid>-*` in the temporary
directory): the engine's own hold on the files of each adapter it loads.

vLLM's worker re-reads an adapter from its path whenever its LRU cache evicted it, in the
middle of serving, and a read error there stops the engine: the files checked at load must
stay what it reads even if the trainer prunes or republishes the checkpoint, so the engine
reads hard links of them (copies across file systems). A hold that fails leaves nothing of
itself: a full disk is DiskFull naming the held directory. A serving process killed with
SIGKILL cannot remove its scratch; the next one to start removes it (the process is gone),
so nothing it half-held outlives it, and a restarted server holds only what it loads anew.
"""

from __future__ import annotations

import os
import pathlib
import shutil

from libs.common import disk, faults, tempdirs
from libs.common.errors import DiskFull, FailedPrecondition

PREFIX = "tuneforge-serving-"


class Scratch:
    def __init__(self, root: str | os.PathLike | None = None):
        self.removed_stale = tempdirs.remove_stale(PREFIX, root)
        self.path = pathlib.Path(tempdirs.make(PREFIX, root))

    def hold(self, source: pathlib.Path, key: str) -> pathlib.Path:
        """`source`'s files (symlinks followed) under adapters/`key`: hard links, or copies
        where linking fails (another file system). Raises DiskFull when the scratch has no
        room, FailedPrecondition when `source` cannot be read; either way nothing is left."""
        target = self.path / "adapters" / key
        try:
            with disk.writing(target, context=f"holding the engine's copy of {source}; free space in {self.path.parent}"):
                _link_tree(source, target)
        except DiskFull:
            shutil.rmtree(target, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise FailedPrecondition(f"cannot read {source}: {exc}", field="path") from exc
        return target

    def release(self, held: str | os.PathLike) -> None:
        shutil.rmtree(held, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _link_tree(source: pathlib.Path, target: pathlib.Path) -> None:
    # Not shutil.copytree: it gathers the errors of every file into one shutil.Error of strings,
    # losing the errno that tells a full disk from an unreadable file.
    target.mkdir(parents=True)
    for directory, subdirectories, files in os.walk(source, onerror=_raise, followlinks=True):
        into = target / pathlib.Path(directory).relative_to(source)
        for name in sorted(subdirectories):
            (into / name).mkdir()
        for name in sorted(files):
            src, dst = os.path.join(directory, name), into / name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            if faults.ARMED:
                faults.reach("serving.hold")


def _raise(error: OSError) -> None:
    raise error
