"""ms-swift's nlg metric (libs.common.nlg): hand-derived values of the definitions it copies
(the rouge package's set-based ROUGE and union LCS, nltk's BLEU-4 with method3 over
characters), and the reference packages themselves where they are installed."""

import math

import pytest

from libs.common import nlg
from libs.common.nlg import _rule_cut as rule

EPS = 1e-8  # the rouge package's F1 denominator term


def f1(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + EPS))


# --- BLEU-4 over characters, smoothing method3

def test_bleu4_identical_is_one():
    assert nlg.bleu4(list("abcd"), list("abcd")) == 1.0


def test_bleu4_short_hypothesis_penalised_and_missing_order_smoothed():
    # p1..p3 = 1, no 4-gram in 3 characters: 0/1 -> 1/2; brevity exp(1 - 4/3)
    assert nlg.bleu4(list("abcd"), list("abc")) == pytest.approx(math.exp(-1 / 3) * 0.5 ** 0.25, rel=1e-12)


def test_bleu4_method3_halves_each_further_missing_order():
    # p3 = 0/1 -> 1/2, p4 = 0/1 -> 1/4 (method1 would give 0.1 both); brevity exp(1 - 4/2)
    assert nlg.bleu4(list("abcd"), list("ab")) == pytest.approx(math.exp(-1) * (0.5 * 0.25) ** 0.25, rel=1e-12)


def test_bleu4_clips_counts_and_smooths_by_each_order_count():
    # p1 = 1/4 (a clipped to its one occurrence), p2 0/3 -> 1/6, p3 0/2 -> 1/8, p4 0/1 -> 1/8; no brevity
    assert nlg.bleu4(list("ab"), list("aaaa")) == pytest.approx((1 / 4 * 1 / 6 * 1 / 8 * 1 / 8) ** 0.25, rel=1e-12)


def test_bleu4_no_common_character_is_zero():
    assert nlg.bleu4(list("ab"), list("xy")) == 0.0


def test_bleu4_chinese_reads_characters():
    # every n-gram of the 4 characters matches; brevity exp(1 - 7/4)
    assert nlg.bleu4(list("我爱北京天安门"), list("我爱北京")) == pytest.approx(math.exp(-0.75), rel=1e-12)


# --- ROUGE as the rouge package computes it

def scores(pred: str, label: str, cut=rule) -> dict:
    return nlg.row_scores(pred, label, cut)


def test_rouge_counts_distinct_words():
    got = scores("the cat on the mat", "the cat sat on the mat")
    # distinct words: hypothesis {the, cat, on, mat}, reference adds sat; the LCS's words are all 4
    assert got["rouge-1"] == pytest.approx(f1(1.0, 4 / 5), rel=1e-12)
    assert got["rouge-l"] == pytest.approx(f1(1.0, 4 / 5), rel=1e-12)
    # bigrams: 4 and 5 distinct, 3 shared (the cat, on the, the mat)
    assert got["rouge-2"] == pytest.approx(f1(3 / 4, 3 / 5), rel=1e-12)


def test_rouge_l_is_the_union_lcs_over_sentences():
    # Lin's example: r = w1..w5, c1 = w1 w2 w6 w7 w8, c2 = w1 w3 w8 w9 w5 -> union {w1 w2 w3 w5}
    got = scores("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5")
    assert got["rouge-l"] == pytest.approx(f1(4 / 8, 4 / 5), rel=1e-12)


def test_rule_cut_follows_jieba_outside_chinese():
    assert rule("Hello, world.") == ["Hello", ",", " ", "world", "."]
    assert rule("pi is 3.14% a+b...") == ["pi", " ", "is", " ", "3.14%", " ", "a", "+", "b", "..."]
    assert rule("我来到北京") == ["我", "来", "到", "北", "京"]


def test_rule_cut_scores_chinese_per_character():
    got = scores("我来到北京", "我来到北京清华大学")
    assert got["rouge-l"] == pytest.approx(f1(1.0, 5 / 9), rel=1e-12)
    assert got["bleu-4"] == pytest.approx(math.exp(1 - 9 / 5), rel=1e-12)


def test_jieba_segments_chinese_words():
    name, cut = nlg.segmenter()
    if name != "jieba":
        pytest.skip("jieba is not installed (requirements: jieba==0.42.1)")
    got = scores("我来到北京", "我来到北京清华大学", cut)  # jieba's README: 我/来到/北京/清华大学
    assert got["rouge-l"] == pytest.approx(f1(1.0, 3 / 4), rel=1e-12)


def test_rows_ms_swift_cannot_score_are_skipped():
    # empty prediction, and a prediction of dots only (rouge finds no sentence in it and raises)
    got, scored = nlg.nlg_scores(["abcd", "", "..."], ["abcd", "x", "y"], rule)
    assert scored == 1
    perfect = round(100 * f1(1.0, 1.0), 6)
    assert got == {"rouge-1": perfect, "rouge-2": 0.0, "rouge-l": perfect, "bleu-4": 100.0}


def test_no_scored_row_reports_zeros():
    assert nlg.nlg_scores([""], ["x"], rule) == (dict.fromkeys(nlg.KEYS, 0.0), 0)


# --- against the reference packages, where installed

PAIRS = [
    ("the cat sat on the mat", "the cat on the mat"),
    ("It is a guide to action. It ensures that the military always obeys the commands of the party.",
     "It is a guide to action which ensures that the military always obeys the commands of the party."),
    ("a b a b a b. b a", "a b b a. a"),
    ("我来到北京清华大学", "我来到北京"),
    ("他来到了网易杭研大厦。今天天气很好", "今天天气不错，他来到了杭研大厦"),
]


def test_bleu4_equals_nltk():
    bleu = pytest.importorskip("nltk.translate.bleu_score", reason="nltk is not installed (requirements: nltk)")
    smooth = bleu.SmoothingFunction().method3
    for label, pred in PAIRS:
        assert nlg.bleu4(list(label), list(pred)) == pytest.approx(
            bleu.sentence_bleu([list(label)], list(pred), smoothing_function=smooth), rel=1e-12), (label, pred)


def test_rouge_equals_the_rouge_package():
    rouge = pytest.importorskip("rouge", reason="rouge is not installed (requirements: rouge==1.0.1)")
    name, cut = nlg.segmenter()
    for label, pred in PAIRS:
        expected = rouge.Rouge().get_scores(" ".join(cut(pred)), " ".join(cut(label)))[0]
        got = nlg.row_scores(pred, label, cut)
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            assert got[key] == pytest.approx(expected[key]["f"], rel=1e-12), (name, key, label, pred)


def test_rule_cut_equals_jieba_on_text_without_chinese():
    name, cut = nlg.segmenter()
    if name != "jieba":
        pytest.skip("jieba is not installed (requirements: jieba==0.42.1)")
    for text in ["Hello, world.", "pi is 3.14% a+b...", "I am Ada, an assistant developed by Bo.",
                 "x = f(y) -> z_1 & w#2\n\tend", PAIRS[1][0]]:
        assert rule(text) == cut(text), text
