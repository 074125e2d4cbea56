"""The reward of each completion: the reward functions named by `--reward_funcs` resolved
(plugins first, then the built-ins) and called on a rollout's completions, their outputs
checked (one number a completion; None is "not applicable", as TRL), and their weighted sum
with `--reward_weights`; plus the submission-time `problems` of the reward flags."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import numbers
import pathlib
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from libs.common.errors import InvalidArgument
from services.trainer.rewards import model, plugins
from services.trainer.rewards.builtin import BUILTINS, RewardParams

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger("tuneforge.trainer.rewards")
BUILTIN = "built-in"
# keyword arguments every reward function gets; a dataset column may not take these names
RESERVED = ("completions", "prompts", "completion_ids", "response_token_ids", "prompt_ids")


class RewardError(InvalidArgument):
    """A reward function that raised, or returned other than one number per completion.
    The message names the function, where it comes from and the row's source."""

    def __init__(self, message: str, function: str, origin: str, source: str | None):
        super().__init__(message, field="reward_funcs")
        self.function, self.origin, self.source = function, origin, source


@dataclass(frozen=True)
class RewardFunc:
    """One reward: its name (the key of its rewards in logs), the callable
    `func(completions, **kwargs) -> list[float | None]`, where it comes from (`built-in`, a
    plugin file, a reward model's path) and the dataset columns it needs."""

    name: str
    func: Callable[..., Sequence[Any]]
    origin: str = BUILTIN
    columns: tuple[str, ...] = ()


def resolve(names: Sequence[str], plugin_files: Sequence[str] = (),
            params: RewardParams | None = None) -> list[RewardFunc]:
    """The reward functions `names` (in order): defined by a plugin file (a later file wins
    over an earlier; a plugin over a built-in of the same name), else built in. A name
    neither defines is an InvalidArgument naming what there is."""
    params = params or RewardParams()
    defined: dict[str, tuple[Callable[..., Any], str]] = {}
    for file in plugin_files:
        module = plugins.load(file)
        for name, func in plugins.reward_functions(module, params).items():
            defined[name] = (func, str(module.__file__))
    funcs = []
    for name in names:
        if name in defined:
            funcs.append(RewardFunc(name, *defined[name]))
        elif name in BUILTINS:
            factory, columns = BUILTINS[name]
            funcs.append(RewardFunc(name, factory(params), BUILTIN, columns))
        else:
            raise InvalidArgument(_unknown(name, {file: [n for n, (_, f) in defined.items() if f == file]
                                                  for file in {f for _, f in defined.values()}}), field="reward_funcs")
    return funcs


def _unknown(name: str, by_file: dict[str, list[str]]) -> str:
    plugins_say = "; ".join(f"{file} defines {', '.join(sorted(names)) or 'none'}" for file, names in by_file.items())
    return (f"{name!r} is neither a built-in reward ({', '.join(BUILTINS)}) nor defined by --external_plugins"
            + (f" ({plugins_say})" if plugins_say else " (none given)"))


def problems(reward_funcs: Sequence[str], reward_weights: Sequence[float] | None, external_plugins: Sequence[str],
             reward_model: str | Sequence[str] | None, params: RewardParams | None = None) -> list[str]:
    """Every problem of the reward flags, found at submission: no reward at all, a plugin
    file missing or failing to import (imported in a child process: the user's code never
    runs in the caller), a name no plugin nor built-in defines, the same name twice, a
    weight count that is not one per reward (functions, then reward models), the
    built-ins' parameters, and a reward model path that holds no reward model."""
    models = [reward_model] if isinstance(reward_model, str) else list(reward_model or [])
    found = []
    if not reward_funcs and not models:
        found.append("reward_funcs: an online method needs a reward: give --reward_funcs NAME ... (built in: "
                     f"{', '.join(BUILTINS)}; or a function of --external_plugins) or --reward_model PATH")
    defined, found_in_plugins = plugins.inspect_files(list(external_plugins)) if external_plugins else ({}, [])
    found.extend(found_in_plugins)
    plugin_names = {name for names in defined.values() for name in names}
    unreadable = len(defined) < len(external_plugins)
    for name in dict.fromkeys(reward_funcs):
        if name not in plugin_names and name not in BUILTINS and not unreadable:
            found.append(f"reward_funcs: {_unknown(name, defined)}")
    repeated = sorted({name for name in reward_funcs if list(reward_funcs).count(name) > 1})
    if repeated:
        found.append(f"reward_funcs: {', '.join(repeated)} given more than once (each reward is logged by its name)")
    if reward_weights is not None and len(reward_weights) != len(reward_funcs) + len(models):
        found.append(f"reward_weights: one weight per reward function and reward model ({len(reward_funcs)} + "
                     f"{len(models)}); got {len(reward_weights)}")
    for weight in reward_weights or []:
        if not math.isfinite(weight):
            found.append(f"reward_weights: must be finite; got {weight}")
    builtins_used = [name for name in reward_funcs if name in BUILTINS and name not in plugin_names]
    found.extend((params or RewardParams()).problems(builtins_used))
    found.extend(model.problems(models))
    return found


def score(funcs: Sequence[RewardFunc], weights: Sequence[float] | None, prompts: list[str], completions: list[str],
          completion_ids: list[list[int]], columns: dict[str, list[Any]], sources: list[str],
          prompt_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [N] float32, {name: [N] float32}) for N completions: each function's rewards,
    and their sum weighted by `weights` (1 each when None). As TRL 1.16's GRPOTrainer: a
    reward of None is NaN ("not applicable to this completion"), a completion's total sums
    the functions that scored it, and it is NaN where none did (unscorable: TRL gives it
    advantage 0), with a warning naming its source.

    Every function gets `completions` (positionally, as ms-swift calls it; an `async def`
    one is awaited) and, as keyword arguments, `prompts`, `completion_ids`
    (also under ms-swift's name `response_token_ids`), `prompt_ids` when given, and each of
    `columns` (one value per completion). `sources` names each completion's row (file:line
    or its key) for errors. A function that raises, returns other than N values, or a value
    that is not a finite number or None, is a RewardError naming it, its file and the row."""
    import torch

    count = len(completions)
    for name, values in (("prompts", prompts), ("completion_ids", completion_ids), ("sources", sources),
                         *((f"columns[{k!r}]", v) for k, v in columns.items()),
                         *((("prompt_ids", prompt_ids),) if prompt_ids is not None else ())):
        if len(values) != count:
            raise ValueError(f"score: {name} holds {len(values)} values for {count} completions")
    names = [func.name for func in funcs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"each reward is logged by its name, so a name may come once; got {', '.join(names)}",
                              field="reward_funcs")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise InvalidArgument(f"one weight per reward ({len(funcs)}); got {len(weights)}", field="reward_weights")
    clashing = [name for name in columns if name in RESERVED]
    if clashing:
        raise InvalidArgument(f"dataset column {clashing[0]!r} has the name of an argument every reward function "
                              f"gets ({', '.join(RESERVED)}); rename it", field="dataset")
    kwargs = {"prompts": prompts, "completion_ids": completion_ids, "response_token_ids": completion_ids, **columns}
    if prompt_ids is not None:
        kwargs["prompt_ids"] = prompt_ids
    per_func = {}
    for func in funcs:
        missing = [c for c in func.columns if c not in columns]
        if missing:
            raise RewardError(f"reward {func.name!r} ({func.origin}) reads the dataset column {missing[0]!r}, which "
                              f"these rows do not have (their columns: {', '.join(columns) or 'none'})",
                              func.name, func.origin, None)
        per_func[func.name] = torch.tensor(_call(func, completions, kwargs, sources), dtype=torch.float32)
    rewards = torch.stack(list(per_func.values()), dim=1) if per_func else torch.zeros(count, 0)
    unscorable = torch.isnan(rewards).all(dim=1) if per_func else torch.zeros(count, dtype=torch.bool)
    total = (rewards * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    total[unscorable] = math.nan
    if per_func and unscorable.any():
        first = int(unscorable.nonzero()[0, 0])
        LOG.warning("every reward function returned None for %d completion(s), first of %s: they are not scored "
                    "(reward NaN, advantage 0)", int(unscorable.sum()), sources[first])
    return total, per_func


def _call(func: RewardFunc, completions: list[str], kwargs: dict[str, Any], sources: list[str]) -> list[float]:
    try:  # its own lists: a function that edits its arguments in place changes nothing for the others
        returned = _run(func.func(list(completions), **{name: list(values) for name, values in kwargs.items()}))
    except Exception as exc:
        raise _raised(func, exc, completions, kwargs, sources) from None
    listed = hasattr(returned, "__len__") and getattr(returned, "ndim", 1) != 0  # not a 0-d array
    if isinstance(returned, (str, bytes, dict)) or not listed:
        raise _error(func, f"returned {_shown(returned)}, not a list of {len(completions)} rewards", sources)
    values = list(returned.tolist() if hasattr(returned, "tolist") else returned)
    if len(values) != len(completions):
        raise _error(func, f"returned {len(values)} rewards for {len(completions)} completions", sources)
    out = []
    for i, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        number = _number(value)
        if number is None:
            raise _error(func, f"returned {_shown(value)}, not a number (nor None: not applicable)", [sources[i]])
        if math.isinf(number):
            raise _error(func, f"returned {number}: an infinite reward would make every advantage of its group NaN",
                         [sources[i]])
        out.append(number)
    return out


def _run(returned: Any) -> Any:
    """An async reward function's result (TRL and ms-swift take `async def` ones too)."""
    return asyncio.run(returned) if inspect.iscoroutine(returned) else returned


def _number(value: Any) -> float | None:
    """The reward `value` as a float (an int too large for one: an infinity), or None when
    it is not a number."""
    if getattr(value, "ndim", None) == 0 or (hasattr(value, "numel") and value.numel() == 1):  # 0-d arrays, tensors
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if not isinstance(value, numbers.Real):  # bool, int, float, Fraction, numpy's scalars
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _raised(func: RewardFunc, exc: Exception, completions: list[str], kwargs: dict[str, Any],
            sources: list[str]) -> RewardError:
    """The error of a function that raised on the whole batch, naming the first row it
    raises on alone (calling it again row by row: only on this failing path), or the batch."""
    failing = sources
    for i in range(len(completions)):
        try:
            _run(func.func(completions[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()}))
        except Exception as alone:
            failing, exc = [sources[i]], alone
            break
    return _error(func, f"raised {type(exc).__name__}: {exc}{_place(exc, func.origin)}", failing)


def _place(exc: BaseException, origin: str) -> str:
    """ ' (at FILE:LINE)': the innermost frame in the plugin's file (the file where it raised
    for a built-in or a reward model)."""
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if origin != BUILTIN and pathlib.Path(f.filename) == pathlib.Path(origin)]
    frame = (inside or frames or [None])[-1]
    return f" (at {frame.filename}:{frame.lineno})" if frame else ""


def _error(func: RewardFunc, what: str, sources: list[str]) -> RewardError:
    rows = sources[0] if len(sources) == 1 else (f"rows {sources[0]} .. {sources[-1]}" if sources else "no rows")
    where = f"row {rows}" if len(sources) == 1 else rows
    origin = "built-in" if func.origin == BUILTIN else func.origin
    return RewardError(f"reward function {func.name!r} ({origin}) {what}, scoring the completions of {where}",
                       func.name, func.origin, sources[0] if len(sources) == 1 else None)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"
