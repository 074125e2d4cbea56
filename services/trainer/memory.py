"""This process's peak resident memory (RSS) per phase of a run: the high-water mark since the
last reset, so the training steps and each checkpoint save are measured apart."""

from __future__ import annotations

import pathlib
import resource

_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int:
    """The highest RSS since the last `reset_peak` (Linux VmHWM), else since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kB


def reset_peak() -> bool:
    """Sets the high-water mark to the current RSS (Linux >= 4.0: "5" > /proc/self/clear_refs).
    False where that is not possible: the peak then runs from the process start."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
