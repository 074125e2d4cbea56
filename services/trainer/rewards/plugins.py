"""Loading the user's reward plugins (`--external_plugins FILE.py ...`): each file imported from
its path under a module name derived from it, and the reward functions it defines: its
module-level functions (`name(completions, **kwargs) -> list[float]`), and the entries of an
ms-swift-style `orms` dict (name -> an ORM class, built with the run's reward parameters as
ms-swift's `args`, or a callable). A file that cannot be imported is a PluginError naming
file:line; `python -m services.trainer.rewards.plugins FILE` does the same import in a
process of its own and prints what it found as JSON (submission-time checks run user code
there, never in the trainer service)."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import traceback
from typing import Any, Callable

from libs.common.errors import InvalidArgument

FIELD = "external_plugins"
# The child must run the very code this process runs, installed or not (as jobs.py starts workers).
_CODE_ROOT = pathlib.Path(__file__).resolve().parents[3]
INSPECT_TIMEOUT_S = 60.0  # a plugin whose import hangs must not hold a submission longer


class PluginError(InvalidArgument):
    """A plugin file that is missing or fails to import; the message names file:line."""

    def __init__(self, message: str):
        super().__init__(message, field=FIELD)


def module_name(path: pathlib.Path) -> str:
    """A module name that cannot clash with a real package or with another plugin of the
    same file name: the stem made an identifier, with a hash of the absolute path."""
    stem = re.sub(r"\W", "_", path.stem) or "plugin"
    return f"tuneforge_reward_plugin_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def where(exc: BaseException, path: pathlib.Path) -> str:
    """file:line of the innermost frame of `exc` in the plugin file (a SyntaxError's own
    place), else just the file."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        return f"{exc.filename}:{exc.lineno}"
    inside = [frame for frame in traceback.extract_tb(exc.__traceback__) if pathlib.Path(frame.filename) == path]
    return f"{path}:{inside[-1].lineno}" if inside else str(path)


def load(file: str) -> Any:
    """The plugin module imported from `file` (each file once per process). Its folder goes
    on sys.path first, as ms-swift's import_external_file does, so it can import its neighbours."""
    path = pathlib.Path(os.path.abspath(os.path.expanduser(file)))
    if not path.is_file():
        raise PluginError(f"{file}: no such file")
    name = module_name(path)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{file}: not a Python file Python can import (give a .py file)")
    module = importlib.util.module_from_spec(spec)
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # dataclasses and pickling look their module up while it runs
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        message = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "swift":
            message += (" (ms-swift is not installed: instead of registering into swift.rewards.orms, define the "
                        "reward as a module-level function, or a dict `orms = {name: YourORM}` in the file)")
        raise PluginError(f"{where(exc, path)}: importing it failed: {type(exc).__name__}: {message}") from None
    return module


def reward_functions(module: Any, params: Any) -> dict[str, Callable[..., Any]]:
    """The reward functions a plugin module defines: its own module-level functions (not the
    ones it imported), then its `orms` dict's entries (an ORM class is built with
    `args=params`, as ms-swift builds it)."""
    found: dict[str, Callable[..., Any]] = {name: getattr(module, name) for name in _own_functions(module)}
    for name, entry in _orms(module).items():
        found[name] = _build_orm(entry, params, module) if inspect.isclass(entry) else entry
    return found


def defined_names(module: Any) -> list[str]:
    """The reward names a plugin module defines (without building its ORM classes)."""
    return [*_own_functions(module), *_orms(module)]


def _own_functions(module: Any) -> list[str]:
    return [name for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")]


def _orms(module: Any) -> dict[str, Any]:
    orms = getattr(module, "orms", None)
    return {str(name): entry for name, entry in orms.items()} if isinstance(orms, dict) else {}


def _build_orm(cls: type, params: Any, module: Any) -> Callable[..., Any]:
    try:
        try:
            return cls(args=params)
        except TypeError:  # an ORM whose constructor takes no args
            return cls()
    except Exception as exc:
        raise PluginError(f"{where(exc, pathlib.Path(module.__file__))}: building its ORM {cls.__name__} failed: "
                          f"{type(exc).__name__}: {exc}") from None


def inspect_files(files: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Imports `files` in a child process: ({file: names it defines}, [problems]), a
    missing file, a failed import (file:line: the error) or a hung one (timeout) each a
    problem. The user's code runs in the child, so neither its side effects nor a crash
    reach the caller."""
    names: dict[str, list[str]] = {}
    problems = []
    present = []
    for file in files:
        if not pathlib.Path(os.path.expanduser(file)).is_file():
            problems.append(f"{FIELD}: {file}: no such file")
        else:
            present.append(file)
    if not present:
        return names, problems
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_CODE_ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        child = subprocess.run([sys.executable, "-m", __name__, *present], capture_output=True, text=True,
                               timeout=INSPECT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return names, problems + [f"{FIELD}: importing {', '.join(present)} took over {INSPECT_TIMEOUT_S:.0f} s"]
    try:
        report = json.loads(child.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
        return names, problems + [f"{FIELD}: importing {', '.join(present)} ended the process: {tail}"]
    for file, result in zip(present, report):
        if "error" in result:
            problems.append(f"{FIELD}: {result['error']}")
        else:
            names[file] = result["names"]
    return names, problems


def main(files: list[str]) -> int:
    report = []
    for file in files:
        try:
            report.append({"names": defined_names(load(file))})
        except PluginError as exc:
            report.append({"error": exc.message})
    sys.stdout.flush()
    print("\n" + json.dumps(report), flush=True)  # on a line of its own, whatever the plugins printed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
