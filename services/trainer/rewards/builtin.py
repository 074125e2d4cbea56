"""The built-in reward functions, with ms-swift's names, parameters and formulas
(swift/rewards/orm.py): `accuracy`, `format`, `cosine`, `repetition`, `soft_overlong`, and
their parameters (`RewardParams`, ms-swift's flag names and defaults)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

LOG = logging.getLogger("tuneforge.trainer.rewards")

# ms-swift's Format: `(?![\s\S])` ends the match at the very end of the text (`$` under
# MULTILINE would also match before a trailing newline).
FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
BOXED = "\\boxed{"


@dataclass(frozen=True)
class RewardParams:
    """The built-ins' parameters, ms-swift's flags and defaults (GRPOArgumentsMixin)."""

    cosine_min_len_value_wrong: float = -0.5  # r^w_0: a wrong answer of length 0
    cosine_max_len_value_wrong: float = 0.0  # r^w_L: a wrong answer of length cosine_max_len
    cosine_min_len_value_correct: float = 1.0  # r^c_0: a correct answer of length 0
    cosine_max_len_value_correct: float = 0.5  # r^c_L: a correct answer of length cosine_max_len
    cosine_max_len: int | None = None  # L_max; None: max_completion_length
    repetition_n_grams: int = 3
    repetition_max_penalty: float = -1.0
    soft_max_length: int | None = None  # L_max of soft_overlong; None: max_completion_length
    soft_cache_length: int | None = None  # L_cache: the penalty ramps over the last L_cache tokens
    max_completion_length: int = 512

    @classmethod
    def of(cls, *sources: Any, **overrides: Any) -> RewardParams:
        """The parameters read from any objects holding fields of these names (a config
        dataclass), later sources and then `overrides` winning."""
        values = {}
        for source in sources:
            for f in dataclasses.fields(cls):
                if getattr(source, f.name, None) is not None:
                    values[f.name] = getattr(source, f.name)
        return cls(**{**values, **overrides})

    def problems(self, names: list[str]) -> list[str]:
        """What is wrong with the parameters of the built-ins in `names`."""
        found = []
        if "cosine" in names and (self.cosine_max_len if self.cosine_max_len is not None
                                  else self.max_completion_length) <= 0:
            found.append(f"cosine_max_len: must be positive; got {self.cosine_max_len}")
        if "repetition" in names and self.repetition_n_grams < 1:
            found.append(f"repetition_n_grams: must be at least 1; got {self.repetition_n_grams}")
        if "soft_overlong" in names:
            if self.soft_cache_length is None:
                found.append("soft_cache_length: reward soft_overlong needs it (the penalty ramps over the last "
                             "soft_cache_length tokens before soft_max_length)")
            elif not 0 < self.soft_cache_length < self.soft_max():
                found.append(f"soft_cache_length: must be positive and below soft_max_length "
                             f"({self.soft_max()}); got {self.soft_cache_length}")
        return found

    def cosine_max(self) -> int:
        return self.cosine_max_len if self.cosine_max_len is not None else self.max_completion_length

    def soft_max(self) -> int:
        return self.soft_max_length if self.soft_max_length is not None else self.max_completion_length


def math_verify_available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


_said_how_accuracy_checks = False


def _say_once_how_accuracy_checks(verified: bool) -> None:
    global _said_how_accuracy_checks
    if _said_how_accuracy_checks:
        return
    _said_how_accuracy_checks = True
    if verified:
        LOG.info("reward accuracy: answers are checked with math_verify (as ms-swift)")
    else:
        LOG.warning("reward accuracy: math_verify is not installed, so an answer is correct (1.0) when it equals "
                    "the solution's exactly once extracted (the <answer> tag's content, else the last \\boxed{}, "
                    "else the whole text; whitespace collapsed); `pip install math_verify` checks as ms-swift does")


def extract_answer(text: str) -> str:
    """The answer in `text`: the first <answer>...</answer>'s content, else the last
    \\boxed{...}'s (braces balanced), else the whole text; stripped, whitespace collapsed."""
    tagged = ANSWER.search(text)
    if tagged:
        return " ".join(tagged.group(1).split())
    start = text.rfind(BOXED)
    if start >= 0:
        depth, i = 1, start + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return " ".join(text[start + len(BOXED):i - 1].split())
    return " ".join(text.split())


def exact_accuracy(completions: list[str], solution: list, **kwargs) -> list[float | None]:
    """1.0 where the completion's extracted answer equals the solution's (a solution with no
    answer, like math_verify's unparsable gold, scores 0.0; a row whose solution is None is
    not scored: None)."""
    rewards = []
    for content, gold in zip(completions, solution):
        if gold is None:
            rewards.append(None)
            continue
        expected = extract_answer(str(gold))
        rewards.append(1.0 if expected and extract_answer(content) == expected else 0.0)
    return rewards


def verified_accuracy(completions: list[str], solution: list, **kwargs) -> list[float | None]:
    """ms-swift's MathAccuracy: math_verify's parse of the <answer> contents (or the whole
    text, then a boxed LaTeX answer) verified against the parsed solution."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    rewards = []
    for content, sol in zip(completions, solution):
        if sol is None:
            rewards.append(None)
            continue
        sol = str(sol)
        content_match = ANSWER.search(content)
        content_to_parse = content_match.group(1).strip() if content_match else content
        sol_match = ANSWER.search(sol)
        gold = parse(sol_match.group(1).strip() if sol_match else sol, extraction_mode="first_match")
        if not gold:
            rewards.append(0.0)
            continue
        if content_match:
            answer = parse(content_to_parse, extraction_mode="first_match")
        else:
            answer = parse(content_to_parse, extraction_mode="first_match", extraction_config=[LatexExtractionConfig(
                normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                                                         boxed=True, units=True),
                boxed_match_priority=0, try_extract_without_anchor=False)])
        try:
            rewards.append(float(verify(gold, answer)))
        except Exception:  # math_verify's own failures score 0, as in ms-swift
            rewards.append(0.0)
    return rewards


def accuracy_function() -> Callable[..., list[float]]:
    verified = math_verify_available()
    _say_once_how_accuracy_checks(verified)
    return verified_accuracy if verified else exact_accuracy


def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 for `<think>...</think> <answer>...</answer>` and nothing after, else 0.0."""
    return [1.0 if FORMAT.match(content) else 0.0 for content in completions]


def cosine_value(length: int, max_length: int, min_value: float, max_value: float) -> float:
    """Yeo et al. 2025 (arXiv 2502.03373): max_value at length 0, falling along a half
    cosine to min_value at max_length."""
    return max_value - (max_value - min_value) * (1 - math.cos(length * math.pi / max_length)) / 2


def cosine_function(params: RewardParams) -> Callable[..., list[float]]:
    accuracy = accuracy_function()

    def cosine(completions: list[str], solution: list, completion_ids: list, **kwargs) -> list[float | None]:
        """Correct answers: cosine_min_len_value_correct at length 0 down to
        cosine_max_len_value_correct at cosine_max_len; wrong ones from
        cosine_min_len_value_wrong up to cosine_max_len_value_wrong. Length in tokens."""
        rewards = []
        for ids, correct in zip(completion_ids, accuracy(completions, solution)):
            if correct is None:  # no solution: not scored, as accuracy
                rewards.append(None)
                continue
            if correct >= 1.0:
                ends = params.cosine_max_len_value_correct, params.cosine_min_len_value_correct
            else:
                ends = params.cosine_max_len_value_wrong, params.cosine_min_len_value_wrong
            rewards.append(cosine_value(len(ids), params.cosine_max(), *ends))
        return rewards

    return cosine


def repetition_function(params: RewardParams) -> Callable[..., list[float]]:
    n, penalty = params.repetition_n_grams, params.repetition_max_penalty

    def repetition(completions: list[str], **kwargs) -> list[float]:
        """(1 - distinct word n-grams / n-grams) x repetition_max_penalty (words: the
        lowercased text split on whitespace); 0.0 for a text of fewer than n words."""
        rewards = []
        for completion in completions:
            words = completion.lower().split()
            if len(words) < n:
                rewards.append(0.0)
                continue
            grams = list(zip(*[words[i:] for i in range(n)]))
            rewards.append((1 - len(set(grams)) / len(grams)) * penalty)
        return rewards

    return repetition


def soft_overlong_function(params: RewardParams) -> Callable[..., list[float]]:
    max_length, cache = params.soft_max(), params.soft_cache_length

    def soft_overlong(completions: list[str], completion_ids: list, **kwargs) -> list[float]:
        """DAPO's soft overlong punishment: 0 up to soft_max_length - soft_cache_length
        tokens, then -1/soft_cache_length a token (-1 at soft_max_length, unbounded past it)."""
        expected = max_length - cache
        return [min(-(len(ids) - expected) / cache, 0) for ids in completion_ids]

    return soft_overlong


# name -> (factory from the parameters, the dataset columns it reads)
BUILTINS: dict[str, tuple[Callable[[RewardParams], Callable[..., list[float]]], tuple[str, ...]]] = {
    "accuracy": (lambda params: accuracy_function(), ("solution",)),
    "format": (lambda params: format_reward, ()),
    "cosine": (cosine_function, ("solution",)),
    "repetition": (repetition_function, ()),
    "soft_overlong": (soft_overlong_function, ()),
}
