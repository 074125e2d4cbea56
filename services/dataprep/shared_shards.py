"""Verified shards shared by the ReadShards streams reading them at once: one copy in
memory however many ranks read a shard, freed when the last of them moves on.

Ranks deal rows round-robin, so the 32 ranks of an epoch read the same shard at the
same time; each stream loading its own copy held 32 copies (3.5 MiB a stream for
1000-row shards of ~330 tokens; 128 streams of 8k-token rows would hold tens of GiB).
A shard is shared only while its file is the one verified: the key holds the file's
identity (inode, size, mtime), so a shard changed on disk is read and verified again,
and refused as before if its sha256 no longer matches."""

from __future__ import annotations

import json
import pathlib
import threading
import weakref

import pyarrow as pa

from libs.common.errors import NotFound
from services.dataprep import metrics, shards


class SharedShards:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Weak: a table lives exactly as long as some stream serving it holds it.
        self._tables: weakref.WeakValueDictionary[tuple, pa.Table] = weakref.WeakValueDictionary()
        self._loading: dict[tuple, threading.Lock] = {}

    def read(self, dataset_dir: pathlib.Path, file: str, sha256: str, columns: dict[str, str] | None) -> pa.Table:
        """shards.read_verified's table, shared with the other streams reading the same file now."""
        path = dataset_dir / file
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotFound(f"{path}: shard listed in the manifest is missing", field="dataset_dir") from None
        key = (str(path.resolve()), sha256, json.dumps(columns, sort_keys=True), stat.st_ino, stat.st_size,
               stat.st_mtime_ns)
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                return table
            loading = self._loading.setdefault(key, threading.Lock())
        # One stream verifies while the others of its epoch wait for its table instead of
        # hashing and parsing the same bytes 32 times over.
        with loading:
            with self._lock:
                table = self._tables.get(key)
            if table is not None:
                return table
            try:
                table = shards.read_verified(dataset_dir, file, sha256, columns)
                with self._lock:
                    self._tables[key] = table
            finally:
                with self._lock:
                    if self._loading.get(key) is loading:
                        del self._loading[key]
        return table

    def nbytes(self) -> int:
        """Bytes of the shards held in memory now."""
        with self._lock:
            return sum(table.nbytes for table in list(self._tables.values()))


# One per process: the servers of a process (tests start several) share what they read.
SHARED = SharedShards()
metrics.SHARDS_IN_MEMORY.set_function(SHARED.nbytes)
