"""Runs pytest files as one Bazel py_test (see pytest_files and pytest_group in bazel/defs.bzl).

Arguments are pytest's (the files and a `-m` marker filter). Under Bazel's test
sharding (`shard_count`) each shard runs every TEST_TOTAL_SHARDS-th file, so a
file's module and session fixtures are set up in one process only. Bazel's
`--test_filter` becomes pytest's `-k` (a file's name selects the file). A run
whose tests are all filtered out by the marker passes with a note saying so; a
run with no tests at all fails, since a test target that cannot fail is a defect.
"""

import os
import sys

import pytest


class _Deselected:
    """Counts what the marker filter removed, to tell 'all slow' from 'no tests'."""

    def __init__(self) -> None:
        self.count = 0

    def pytest_deselected(self, items) -> None:
        self.count += len(items)


# Set by the BUILD rule relative to the runfiles; absolute so tests that change directory keep them.
_RUNFILES_PATHS = ("TUNEFORGE_HOME",)


def shard(argv: list[str], environ) -> list[str]:
    """argv with only this shard's test files (every total-th, from its index), the other arguments
    kept; all of argv outside sharding. Tells Bazel the shard protocol is honoured."""
    total = int(environ.get("TEST_TOTAL_SHARDS", "1") or "1")
    if total <= 1:
        return argv
    if environ.get("TEST_SHARD_STATUS_FILE"):
        open(environ["TEST_SHARD_STATUS_FILE"], "w").close()
    index = int(environ["TEST_SHARD_INDEX"])
    files = [arg for arg in argv if arg.endswith(".py")]
    mine = set(files[index::total])
    return [arg for arg in argv if not arg.endswith(".py") or arg in mine]


def main(argv: list[str]) -> int:
    for name in _RUNFILES_PATHS:
        if os.environ.get(name):
            os.environ[name] = os.path.abspath(os.environ[name])
    args = [*shard(argv, os.environ), "-p", "no:cacheprovider"]  # runfiles are not a place for .pytest_cache
    if os.environ.get("TESTBRIDGE_TEST_ONLY"):
        args += ["-k", os.environ["TESTBRIDGE_TEST_ONLY"]]
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    deselected = _Deselected()
    code = pytest.main(args, plugins=[deselected])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED and deselected.count:
        print(f"every test here ({deselected.count}) is deselected (marked slow or gpu: they run with pytest, "
              "not Bazel; or not matched by --test_filter)")
        return 0
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
