"""Test-only fault injection: named points in the services where a test makes the process stop
(SIGSTOP: it is then killed, or resumed with SIGCONT, from outside) or die (SIGKILL) at a
chosen moment, such as halfway through publishing a checkpoint.

Armed only by the TUNEFORGE_FAULT environment variable of the process, read once at import:
`POINT[#N]=ACTION[,...]` acts the N-th time (default: the first) POINT is reached, ACTION being
`stop` or `kill`. Unarmed, `ARMED` is empty and every call site (`if faults.ARMED:
faults.reach("point")`) calls nothing. With TUNEFORGE_FAULT_REPORT=FILE each point acted on
first appends `{"point": ..., "pid": ...}` to FILE, so a test learns which process to act on.

Points: trainer.publish (a run starts publishing a checkpoint, before it writes anything),
checkpoint.built (a checkpoint's files are written in its temporary directory, not yet its
manifest nor renamed into place), serving.hold (serving has linked or copied one more file
of an adapter it loads), worker.exit (a torchrun rank has finished its run and is about
to exit).
"""

from __future__ import annotations

import collections
import json
import os
import signal

ENV = "TUNEFORGE_FAULT"
REPORT_ENV = "TUNEFORGE_FAULT_REPORT"
SIGNALS = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}


def parse(spec: str) -> dict[str, tuple[int, str]]:
    """point -> (the hit it acts on, action). A malformed spec raises ValueError: a test whose
    fault never fires would wait for it instead of failing."""
    armed: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        where, _, action = item.partition("=")
        point, _, nth = where.partition("#")
        if not point or action not in SIGNALS or not (nth == "" or nth.isdigit() and int(nth) > 0):
            raise ValueError(f"{ENV}: {item!r}: expected POINT[#N]=ACTION with ACTION one of {', '.join(SIGNALS)}")
        armed[point] = (int(nth or 1), action)
    return armed


ARMED = parse(os.environ.get(ENV, ""))
_reached: collections.Counter[str] = collections.Counter()


def reach(point: str) -> None:
    """Acts if `point` is armed and this is the hit it waits for."""
    if point not in ARMED:
        return
    _reached[point] += 1
    nth, action = ARMED[point]
    if _reached[point] != nth:
        return
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"point": point, "pid": os.getpid(), "action": action}) + "\n")
    os.kill(os.getpid(), SIGNALS[action])
