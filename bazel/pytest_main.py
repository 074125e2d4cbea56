"""Runs one pytest file as a Bazel py_test (see pytest_files in bazel/defs.bzl).

Arguments are pytest's (the file and a `-m` marker filter). A file whose tests
are all filtered out passes with a note saying so; a file with no tests at all
fails, since a test target that cannot fail is a defect.
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


def main(argv: list[str]) -> int:
    for name in _RUNFILES_PATHS:
        if os.environ.get(name):
            os.environ[name] = os.path.abspath(os.environ[name])
    args = [*argv, "-p", "no:cacheprovider"]  # runfiles are not a place for .pytest_cache
    if os.environ.get("XML_OUTPUT_FILE"):
        args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
    deselected = _Deselected()
    code = pytest.main(args, plugins=[deselected])
    if code == pytest.ExitCode.NO_TESTS_COLLECTED and deselected.count:
        print(f"every test here ({deselected.count}) is marked slow or gpu: they run with pytest, not Bazel")
        return 0
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
