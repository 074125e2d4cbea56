"""The reward functions of the online methods: each built-in against values computed by hand
from ms-swift's formulas (swift/rewards/orm.py), plugin files (module-level functions and
ms-swift-style `orms` classes) with exactly the keyword arguments they are promised, the
weighted sum and TRL 1.16's None handling, the typed one-line errors of a reward function that
misbehaves (naming the function, its file and the row), and the submission-time problems."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.errors import InvalidArgument
from services.trainer import rewards
from services.trainer.rewards import builtin, plugins
from services.trainer.rewards.builtin import RewardParams


def call(name: str, completions: list[str], params: RewardParams = RewardParams(), **kwargs) -> list[float]:
    (func,) = rewards.resolve([name], params=params)
    return func.func(completions, **kwargs)


def write(tmp_path, name: str, source: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return str(path)


def score(funcs, completions, columns=None, weights=None, ids=None, prompts=None):
    n = len(completions)
    return rewards.score(funcs, weights, prompts or [f"p{i}" for i in range(n)], completions,
                         ids or [[7] * (i + 1) for i in range(n)], columns or {},
                         [f"rl.jsonl:{i + 1}" for i in range(n)])


# --- built-ins -------------------------------------------------------------------------------


def test_format_is_ms_swift_pattern_to_the_very_end():
    completions = [
        "<think>a</think><answer>b</answer>",
        "<think>two\nlines</think>\n\n<answer>x\ny</answer>",  # DOTALL, whitespace between
        "<think>a</think><answer>b</answer>\n",  # (?![\s\S]): not even a trailing newline
        "<answer>b</answer>",
        " <think>a</think><answer>b</answer>",
        "<think>a</think><answer>b</answer> and more",
        "<think>a</think>text<answer>b</answer>",
    ]
    assert call("format", completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_exact_accuracy_matches_the_extracted_answer_exactly():
    completions = ["<think>2+2</think><answer> 4 </answer>", "so \\boxed{\\frac{1}{2}} it is",
                   "The answer is 4", "<answer>5</answer>", "anything", "<answer>a  b\nc</answer>"]
    solution = ["4", "<answer>\\frac{1}{2}</answer>", "The  answer is\n4", "4", "", "a b c"]
    assert builtin.exact_accuracy(completions, solution=solution) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # a row without a solution (a multi-task dataset) is not scored: None, and so by cosine
    assert builtin.exact_accuracy(["4", "4"], solution=[None, 4]) == [None, 1.0]
    assert call("cosine", ["4", "4"], solution=[None, "4"], completion_ids=[[1], [1]])[0] is None


def test_accuracy_says_once_how_it_checks(monkeypatch, caplog):
    monkeypatch.setattr(builtin, "_said_how_accuracy_checks", False)
    verified = builtin.math_verify_available()  # not installed in this venv: the exact match runs
    with caplog.at_level(logging.INFO, logger="tuneforge.trainer.rewards"):
        funcs = rewards.resolve(["accuracy", "cosine"])
        rewards.resolve(["accuracy"])
    said = [r.getMessage() for r in caplog.records if "math_verify" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("reward accuracy:")
    assert ("checked with math_verify" if verified else "math_verify is not installed") in said[0]
    assert funcs[0].func is (builtin.verified_accuracy if verified else builtin.exact_accuracy)


@pytest.mark.skipif(not builtin.math_verify_available(), reason="math_verify is not installed")
def test_accuracy_with_math_verify_is_ms_swift():
    completions = ["<answer>0.5</answer>", "it is $\\boxed{\\frac{1}{2}}$", "<answer>3</answer>"]
    assert builtin.verified_accuracy(completions, ["\\frac{1}{2}"] * 3) == [1.0, 1.0, 0.0]


def test_extract_answer():
    assert builtin.extract_answer("x <answer>1</answer> <answer>2</answer>") == "1"  # the first tag
    assert builtin.extract_answer("\\boxed{1} then \\boxed{{a}{b}}") == "{a}{b}"  # the last box, braces balanced
    assert builtin.extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"
    assert builtin.extract_answer("  a \n b ") == "a b"


def test_cosine_is_the_half_cosine_between_the_written_ends(monkeypatch):
    # correctness by exact match (with math_verify installed, a bare "4" is no LaTeX answer: 0)
    monkeypatch.setattr(builtin, "math_verify_available", lambda: False)
    # Lmax 10: correct answers from 1.0 (length 0) to 0.5 (length 10), wrong ones from -0.5 to 0.0
    params = RewardParams(cosine_max_len=10)
    completions = ["<answer>4</answer>"] * 4 + ["<answer>5</answer>"] * 3
    ids = [[], [1] * 5, [1] * 10, [1] * 2, [], [1] * 5, [1] * 10]
    got = call("cosine", completions, params, solution=["4"] * 7, completion_ids=ids)
    # t=2: (1 - cos(0.2 pi)) / 2 = 0.0954915; 1.0 - 0.5 x 0.0954915 = 0.9522542
    assert got == pytest.approx([1.0, 0.75, 0.5, 0.9522542, -0.5, -0.25, 0.0], abs=1e-7)
    # unset cosine_max_len is max_completion_length; the four values are ms-swift's flags
    params = RewardParams(max_completion_length=4, cosine_min_len_value_correct=2.0, cosine_max_len_value_correct=1.0,
                          cosine_min_len_value_wrong=-3.0, cosine_max_len_value_wrong=-1.0)
    got = call("cosine", ["4", "5"], params, solution=["4", "4"], completion_ids=[[1, 2], [1, 2]])
    assert got == pytest.approx([1.5, -2.0])


def test_repetition_penalises_repeated_word_ngrams():
    completions = ["a b a b a b", "A b c a B C", "two words", "", "one two three four"]
    # trigrams: 4 with 2 distinct -> (1 - 2/4) x -1; 4 with 3 distinct (lowercased) -> -0.25; too short -> 0
    assert call("repetition", completions) == [-0.5, -0.25, 0.0, 0.0, 0.0]
    params = RewardParams(repetition_n_grams=2, repetition_max_penalty=-2.0)
    assert call("repetition", ["x x x", "x y"], params) == [-1.0, 0.0]  # bigrams (x x) twice: 1/2 x -2


def test_soft_overlong_ramps_over_the_cache_before_the_max_length():
    # Lmax 10, Lcache 4: free up to 6 tokens, then -1/4 a token
    params = RewardParams(soft_max_length=10, soft_cache_length=4)
    ids = [[0] * n for n in (0, 5, 6, 8, 10, 12)]
    assert call("soft_overlong", [""] * 6, params, completion_ids=ids) == [0, 0, 0, -0.5, -1.0, -1.5]
    params = RewardParams(max_completion_length=8, soft_cache_length=2)  # unset soft_max_length: max_completion_length
    assert call("soft_overlong", [""] * 2, params, completion_ids=[[0] * 7, [0] * 8]) == [-0.5, -1.0]


def test_params_read_from_a_config_and_their_problems():
    class Config:  # a method's config: the fields of the same names are read, others ignored
        repetition_n_grams, cosine_max_len, beta = 4, None, 0.1

    assert RewardParams.of(Config(), max_completion_length=64) == RewardParams(repetition_n_grams=4,
                                                                                max_completion_length=64)
    assert RewardParams().problems(["soft_overlong"]) == [
        "soft_cache_length: reward soft_overlong needs it (the penalty ramps over the last soft_cache_length tokens "
        "before soft_max_length)"]
    assert RewardParams(soft_max_length=100, soft_cache_length=100, repetition_n_grams=0).problems(
        ["soft_overlong", "repetition"]) == [
        "repetition_n_grams: must be at least 1; got 0",
        "soft_cache_length: must be positive and below soft_max_length (100); got 100"]
    assert RewardParams(repetition_n_grams=0).problems(["format"]) == []  # only the rewards used are checked


# --- plugins ---------------------------------------------------------------------------------

PLUGIN = """
    import json
    from math import sqrt  # imported, not defined here: no reward of that name

    SEEN = []

    def short(completions, **kwargs):
        SEEN.append(kwargs)
        return [1.0 / len(c) for c in completions]

    def _helper(completions, **kwargs):
        return [0.0] * len(completions)

    class LengthOrm:  # ms-swift's ORM form: built with args (the run's reward parameters), then called
        def __init__(self, args=None, **kwargs):
            self.scale = args.repetition_n_grams

        def __call__(self, completions, **kwargs):
            return [self.scale * len(ids) for ids in kwargs["response_token_ids"]]

    orms = {"length_orm": LengthOrm}
"""


def test_a_plugin_function_gets_prompts_ids_and_every_column(tmp_path):
    file = write(tmp_path, "my_rewards.py", PLUGIN)
    funcs = rewards.resolve(["short", "length_orm"], [file], RewardParams(repetition_n_grams=3))
    assert [(f.name, f.origin) for f in funcs] == [("short", file), ("length_orm", file)]
    total, per_func = score(funcs, ["ab", "abcd"], {"solution": ["1", "2"], "level": [3, None]}, ids=[[5], [6, 7]],
                            prompts=["q1", "q2"])
    assert per_func["short"].tolist() == [0.5, 0.25] and per_func["length_orm"].tolist() == [3.0, 6.0]
    assert total.tolist() == [3.5, 6.25]
    module = plugins.load(file)
    assert module.SEEN == [{"prompts": ["q1", "q2"], "completion_ids": [[5], [6, 7]],
                            "response_token_ids": [[5], [6, 7]], "solution": ["1", "2"], "level": [3, None]}]
    assert sorted(plugins.reward_functions(module, RewardParams())) == ["length_orm", "short"]  # not sqrt, _helper
    assert module.__name__.startswith("tuneforge_reward_plugin_my_rewards_")


def test_an_orm_that_cannot_be_built_names_its_line(tmp_path):
    file = write(tmp_path, "orm.py", """\
        class Needs:
            def __init__(self, args=None):
                self.value = args.cosine_magic

        orms = {"needs": Needs}
    """)
    with pytest.raises(rewards.PluginError) as raised:
        rewards.resolve(["needs"], [file])
    assert str(raised.value) == (f"external_plugins: {file}:3: building its ORM Needs failed: AttributeError: "
                                 "'RewardParams' object has no attribute 'cosine_magic'")


def test_same_named_files_are_different_modules_and_a_plugin_wins_over_a_builtin(tmp_path):
    first = write(tmp_path, "a/rewards.py", "def one(completions, **kw):\n    return [1] * len(completions)\n")
    second = write(tmp_path, "b/rewards.py", "def format(completions, **kw):\n    return [2] * len(completions)\n")
    assert plugins.module_name(plugins.pathlib.Path(first)) != plugins.module_name(plugins.pathlib.Path(second))
    funcs = rewards.resolve(["one", "format"], [first, second])
    assert [(f.name, f.origin) for f in funcs] == [("one", first), ("format", second)]
    assert score(funcs, ["<think>a</think><answer>b</answer>"])[0].tolist() == [3.0]


def test_plugin_files_that_cannot_load_name_file_and_line(tmp_path):
    with pytest.raises(rewards.PluginError) as missing:
        plugins.load(str(tmp_path / "nope.py"))
    assert str(missing.value) == f"external_plugins: {tmp_path / 'nope.py'}: no such file"
    broken = write(tmp_path, "broken.py", "x = 1\n\ndef f(:\n    pass\n")
    with pytest.raises(rewards.PluginError) as syntax:
        plugins.load(broken)
    assert str(syntax.value) == f"external_plugins: {broken}:3: importing it failed: SyntaxError: invalid syntax"
    failing = write(tmp_path, "failing.py", "import os\n\nvalue = 1 / 0\n")
    with pytest.raises(rewards.PluginError) as raised:
        plugins.load(failing)
    assert str(raised.value) == (f"external_plugins: {failing}:3: importing it failed: ZeroDivisionError: "
                                 "division by zero")
    assert raised.value.__suppress_context__  # the user sees one line, not importlib's frames
    swift = write(tmp_path, "swift_style.py", "from swift.rewards import ORM, orms\n")
    with pytest.raises(rewards.PluginError) as ms_swift:
        plugins.load(swift)
    assert str(ms_swift.value) == (
        f"external_plugins: {swift}:1: importing it failed: ModuleNotFoundError: No module named 'swift' (ms-swift is "
        "not installed: instead of registering into swift.rewards.orms, define the reward as a module-level "
        "function, or a dict `orms = {name: YourORM}` in the file)")


def test_an_unknown_name_lists_the_builtins_and_what_the_plugins_define(tmp_path):
    file = write(tmp_path, "mine.py", "def mine(completions, **kw):\n    return [0] * len(completions)\n")
    with pytest.raises(InvalidArgument) as unknown:
        rewards.resolve(["accuracy", "mien"], [file])
    assert str(unknown.value) == (
        "reward_funcs: 'mien' is neither a built-in reward (accuracy, format, cosine, repetition, soft_overlong) nor "
        f"defined by --external_plugins ({file} defines mine)")


# --- scoring ---------------------------------------------------------------------------------


def func(name, body, origin="built-in"):
    return rewards.RewardFunc(name, body, origin)


def test_a_name_twice_is_refused():
    with pytest.raises(InvalidArgument, match="a name may come once; got format, repetition, format"):
        score(rewards.resolve(["format", "repetition", "format"]), ["x"])


def test_weighted_sum_and_none_as_trl():
    first = func("first", lambda completions, **kw: [1.0, None, 3, None])
    second = func("second", lambda completions, **kw: [10, 20.0, None, None])
    total, per_func = score([first, second], ["a", "b", "c", "d"], weights=[2.0, -0.5])
    # TRL 1.16: None -> NaN, the weighted nansum over the functions that scored, NaN where none did
    assert per_func["first"].tolist()[::2] == [1.0, 3.0] and math.isnan(per_func["first"][1])
    assert total[:3].tolist() == [2.0 - 5.0, -10.0, 6.0] and math.isnan(total[3])
    assert total.dtype == torch.float32 and total.shape == (4,)
    total, _ = score([first], ["a", "b", "c", "d"])  # default weights: 1 each
    assert total[::2].tolist() == [1.0, 3.0]


def test_a_completion_no_function_scores_is_warned_with_its_source(caplog):
    none = func("none", lambda completions, **kw: [None, 1.0, None])
    with caplog.at_level(logging.WARNING, logger="tuneforge.trainer.rewards"):
        score([none], ["a", "b", "c"])
    assert [r.getMessage() for r in caplog.records] == [
        "every reward function returned None for 2 completion(s), first of rl.jsonl:1: they are not scored "
        "(reward NaN, advantage 0)"]


def test_functions_get_their_own_argument_lists():
    def greedy(completions, **kwargs):
        completions.clear()
        kwargs["solution"].clear()
        return []

    def honest(completions, solution, **kwargs):
        return [float(c == s) for c, s in zip(completions, solution)]

    with pytest.raises(rewards.RewardError, match="returned 0 rewards for 2 completions"):
        score([func("greedy", greedy)], ["a", "b"], {"solution": ["a", "c"]})
    clears = func("clears", lambda completions, **kwargs: greedy(completions, **kwargs) or [0.0, 0.0])
    assert score([clears, func("honest", honest)], ["a", "b"], {"solution": ["a", "c"]})[1]["honest"].tolist() == [
        1.0, 0.0]


def test_the_plugin_of_the_docs_works(tmp_path):
    docs = (pathlib.Path(__file__).parents[3] / "docs" / "rlhf.md").read_text()
    source = docs.split("**Writing a reward plugin.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    file = write(tmp_path, "my_rewards.py", source)
    total, per_func = score(rewards.resolve(["short", "exact"], [file]), [" 4", "5"], {"solution": ["4", None]},
                            ids=[[1, 2, 3], [1]])
    assert per_func["short"].tolist() == [0.25, 0.5] and per_func["exact"][0] == 1.0
    assert math.isnan(per_func["exact"][1]) and total.tolist() == [1.25, 0.5]


def test_numbers_of_any_kind_are_rewards():
    values = func("kinds", lambda completions, **kw: np.array([1, 2.5, True]))
    assert score([values], ["a", "b", "c"])[0].tolist() == [1.0, 2.5, 1.0]
    scalars = func("scalars", lambda completions, **kw: [torch.tensor(0.5), np.float32(2.0), np.int64(3)])
    assert score([scalars], ["a", "b", "c"])[0].tolist() == [0.5, 2.0, 3.0]


def test_async_functions_and_array_returns():
    async def later(completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert score([func("later", later)], ["a", "bcd"])[0].tolist() == [1.0, 3.0]
    with pytest.raises(rewards.RewardError, match=r"returned ndarray array\(1\.\), not a list of 2 rewards"):
        score([func("zero_d", lambda completions, **kw: np.array(1.0))], ["a", "b"])


def test_a_function_raising_on_one_row_names_it_its_file_and_that_row(tmp_path):
    file = write(tmp_path, "plugin.py", """\
        def ratio(completions, level, **kwargs):
            out = []
            for c, n in zip(completions, level):
                out.append(len(c) / n)
            return out
    """)
    funcs = rewards.resolve(["ratio"], [file])
    with pytest.raises(rewards.RewardError) as raised:
        score(funcs, ["a", "bb", "ccc"], {"level": [1, 2, 0]})
    assert str(raised.value) == (f"reward_funcs: reward function 'ratio' ({file}) raised ZeroDivisionError: "
                                 f"division by zero (at {file}:4), scoring the completions of row rl.jsonl:3")
    assert (raised.value.function, raised.value.origin, raised.value.source) == ("ratio", file, "rl.jsonl:3")
    assert raised.value.__suppress_context__ and "\n" not in str(raised.value)


def test_a_function_failing_only_on_the_whole_batch_names_the_batch():
    def batch_only(completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [0.0]

    with pytest.raises(rewards.RewardError) as raised:
        score([func("batch_only", batch_only)], ["a", "b"])
    assert str(raised.value).startswith("reward_funcs: reward function 'batch_only' (built-in) raised RuntimeError: "
                                        "batch too big (at ")
    assert str(raised.value).endswith(", scoring the completions of rows rl.jsonl:1 .. rl.jsonl:2")
    assert raised.value.source is None


@pytest.mark.parametrize("returned, says", [
    (lambda c: [1.0], "returned 1 rewards for 3 completions, scoring the completions of rows rl.jsonl:1 .. rl.jsonl:3"),
    (lambda c: 1.0, "returned float 1.0, not a list of 3 rewards, scoring the completions of rows rl.jsonl:1 .. "
                    "rl.jsonl:3"),
    (lambda c: "abc", "returned str 'abc', not a list of 3 rewards, scoring the completions of rows rl.jsonl:1 .. "
                      "rl.jsonl:3"),
    (lambda c: [0.0, "high", 1.0], "returned str 'high', not a number (nor None: not applicable), scoring the "
                                   "completions of row rl.jsonl:2"),
    (lambda c: [0.0, 1.0, [2.0]], "returned list [2.0], not a number (nor None: not applicable), scoring the "
                                  "completions of row rl.jsonl:3"),
    (lambda c: [0.0, float("-inf"), 1.0], "returned -inf: an infinite reward would make every advantage of its group "
                                          "NaN, scoring the completions of row rl.jsonl:2"),
])
def test_a_wrong_return_is_a_typed_error_naming_function_and_row(returned, says):
    bad = func("bad", lambda completions, **kwargs: returned(completions), origin="/x/plugin.py")
    with pytest.raises(rewards.RewardError) as raised:
        score([bad], ["a", "b", "c"])
    assert str(raised.value) == f"reward_funcs: reward function 'bad' (/x/plugin.py) {says}"


def test_a_builtin_needing_a_missing_column_says_so():
    with pytest.raises(rewards.RewardError) as raised:
        score(rewards.resolve(["accuracy"]), ["4"], {"answer": ["4"]})
    assert str(raised.value) == ("reward_funcs: reward 'accuracy' (built-in) reads the dataset column 'solution', "
                                 "which these rows do not have (their columns: answer)")


def test_a_column_named_like_an_argument_is_refused():
    with pytest.raises(InvalidArgument) as raised:
        score(rewards.resolve(["format"]), ["x"], {"prompts": ["y"]})
    assert str(raised.value) == ("dataset: dataset column 'prompts' has the name of an argument every reward function "
                                 "gets (completions, prompts, completion_ids, response_token_ids, prompt_ids); "
                                 "rename it")


# --- submission-time problems ----------------------------------------------------------------


def test_problems_are_all_reported_at_once_without_running_the_plugins_here(tmp_path):
    good = write(tmp_path, "good.py", """\
        import os
        os.environ["TUNEFORGE_TEST_PLUGIN_RAN"] = "1"
        print("plugins may print while they load")

        def short(completions, **kwargs):
            return [0.0] * len(completions)
    """)
    failing = write(tmp_path, "failing.py", "import json\nimport no_such_module_here\n")
    missing = str(tmp_path / "missing.py")
    found = rewards.problems(["short", "shrot", "format", "format", "soft_overlong"], [1.0, 1.0], [good],
                             str(tmp_path / "no_rm"))
    assert found == [
        "reward_funcs: 'shrot' is neither a built-in reward (accuracy, format, cosine, repetition, soft_overlong) nor "
        f"defined by --external_plugins ({good} defines short)",
        "reward_funcs: format given more than once (each reward is logged by its name)",
        "reward_weights: one weight per reward function and reward model (5 + 1); got 2",
        "soft_cache_length: reward soft_overlong needs it (the penalty ramps over the last soft_cache_length tokens "
        "before soft_max_length)",
        f"reward_model: {tmp_path / 'no_rm'} does not exist",
    ]
    assert "TUNEFORGE_TEST_PLUGIN_RAN" not in os.environ
    # a plugin missing or failing to import (its error at file:line); names are not checked then, as the
    # file that cannot be read may define them
    assert rewards.problems(["short", "mine"], None, [good, missing, failing], None) == [
        f"external_plugins: {missing}: no such file",
        f"external_plugins: {failing}:2: importing it failed: ModuleNotFoundError: No module named "
        "'no_such_module_here'"]
    assert rewards.problems([], None, [], None) == [
        "reward_funcs: an online method needs a reward: give --reward_funcs NAME ... (built in: accuracy, format, "
        "cosine, repetition, soft_overlong; or a function of --external_plugins) or --reward_model PATH"]
    assert rewards.problems(["short", "accuracy"], [1.0, 0.5], [good], None) == []


def test_an_int_too_large_for_a_float_is_an_infinite_reward():
    """float(10**400) raised OverflowError out of score (seen while writing the fuzzer below, whose integers stay
    far smaller)."""
    with pytest.raises(rewards.RewardError, match=r"returned inf: an infinite reward"):
        score([func("big", lambda completions, **kw: [10**400])], ["a"])


RETURNED = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.binary(max_size=3),
    st.fractions(), st.decimals(allow_nan=True), st.just(torch.tensor([1.0, 2.0])), st.just(np.float16(3)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(max_examples=settings().max_examples // 2)
@given(st.one_of(RETURNED, st.lists(st.one_of(RETURNED, st.lists(RETURNED, max_size=2)), max_size=4),
                 st.lists(RETURNED, max_size=4).map(tuple)))
def test_fuzz_whatever_a_function_returns_it_is_a_reward_or_a_typed_error(returned):
    """Three completions: rewards are exactly three finite numbers or NaN (None, NaN), the
    total their sum; anything else is a RewardError naming the function, and nothing else
    escapes."""
    try:
        total, per_func = score([func("any", lambda completions, **kw: returned, "/x/any.py")], ["a", "b", "c"])
    except rewards.RewardError as exc:
        assert str(exc).startswith("reward_funcs: reward function 'any' (/x/any.py) ") and "\n" not in str(exc)
        return
    values = per_func["any"]
    assert values.shape == (3,) and not torch.isinf(values).any()
    torch.testing.assert_close(total[~torch.isnan(values)], values[~torch.isnan(values)])


def test_a_plugin_that_hangs_or_kills_its_importer_is_a_problem(tmp_path, monkeypatch):
    hangs = write(tmp_path, "hangs.py", "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(plugins, "INSPECT_TIMEOUT_S", 1.0)
    assert rewards.problems(["x"], None, [hangs], None) == [f"external_plugins: importing {hangs} took over 1 s"]
    exits = write(tmp_path, "exits.py", "import os, sys\nsys.stderr.write('bye\\n')\nos._exit(3)\n")
    assert rewards.problems(["x"], None, [exits], None) == [f"external_plugins: importing {exits} ended the process: bye"]
