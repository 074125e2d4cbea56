"""ms-swift's `nlg` metric (swift/plugin/metric.py `compute_rouge_bleu`): ROUGE-1, ROUGE-2 and
ROUGE-L as the `rouge` package (pltrdy/rouge 1.0.1) computes their F1 over jieba's words, and
BLEU-4 as nltk's `sentence_bleu` computes it over characters with smoothing method3; each the
mean over the scored rows, times 100.

Defined here as those packages define them, quirks included, so that numbers compare with
ms-swift's: the `rouge` package splits a text into sentences at every "." and counts each
n-gram once (its default `exclusive=True`: sets, not multisets), and ROUGE-L is its
summary-level union LCS. ms-swift's BLEU-4 reads characters (`list(label)`), not words, and
smooths with method3 (NIST's geometric sequence), not method1.

Words come from jieba when it is installed (ms-swift's segmentation). Without it, text is
cut by a rule that jieba follows for text without Chinese (runs of ASCII letters and digits,
one token per other character) and Chinese is cut per character: ROUGE of Chinese text then
differs from ms-swift's, and `segmenter()` says which one ran. BLEU-4 never depends on it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Iterable, Sequence

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")

# jieba's own cut of what is not Chinese (jieba.cut's re_han_default blocks, then finalseg's
# re_skip words): runs of these characters are split into ASCII words (decimals and percents
# kept whole) and the runs between them ("..." stays one token); any other character is a token.
_BLOCK = re.compile(r"([\u4E00-\u9FD5a-zA-Z0-9+#&._%\-]+)")
_CHINESE = re.compile(r"([\u4E00-\u9FD5]+)")
_ASCII_WORD = re.compile(r"([a-zA-Z0-9]+(?:\.\d+)?%?)")


def _rule_cut(text: str) -> list[str]:
    """jieba's cut without its dictionary: the same tokens for text without Chinese (unless
    the dictionary holds the ASCII word), Chinese one character a token."""
    tokens: list[str] = []
    for block in _BLOCK.split(text):
        if not _BLOCK.fullmatch(block or " "):
            tokens.extend(block)
            continue
        for piece in _CHINESE.split(block):
            if _CHINESE.fullmatch(piece or " "):
                tokens.extend(piece)
            else:
                tokens.extend(word for word in _ASCII_WORD.split(piece) if word)
    return tokens


def segmenter() -> tuple[str, Callable[[str], list[str]]]:
    """("jieba", its cut) when jieba is installed, else ("rule", the rule above)."""
    try:
        import jieba
    except ImportError:
        return "rule", _rule_cut
    jieba.setLogLevel(60)  # its dictionary-loading chatter would land in every eval's stderr
    return "jieba", lambda text: list(jieba.cut(text))


def _sentences(text: str) -> list[str]:
    # the rouge package's Rouge._get_scores: sentences at ".", whitespace collapsed
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _words(sentences: Iterable[str]) -> list[str]:
    return [word for sentence in sentences for word in sentence.split(" ")]


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _f1(overlap: int, hyp: int, ref: int) -> float:
    precision = overlap / hyp if hyp else 0.0
    recall = overlap / ref if ref else 0.0
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    """F1 of the sets of word n-grams of two sentence lists (rouge.rouge_score.rouge_n)."""
    hyp_grams, ref_grams = _ngrams(_words(hyp), n), _ngrams(_words(ref), n)
    return _f1(len(hyp_grams & ref_grams), len(hyp_grams), len(ref_grams))


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of x and y, found as rouge's `_recon_lcs`
    finds it (its tie-break decides which words, and the union counts words)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(table[i - 1][j], table[i][j - 1])
    found, i, j = set(), len(x), len(y)
    while i > 0 and j > 0:  # rouge recurses; a loop has no depth limit on long answers
        if x[i - 1] == y[j - 1]:
            found.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return found


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    """Summary-level ROUGE-L F1 (rouge.rouge_score.rouge_l_summary_level): the union of each
    reference sentence's LCS with every hypothesis sentence, as a set of words, over the
    distinct words of each side."""
    ref_size, hyp_size = len(set(_words(ref))), len(set(_words(hyp)))
    union: set[str] = set()
    for sentence in ref:
        words = sentence.split(" ")
        for hyp_sentence in hyp:
            union |= _lcs_words(words, hyp_sentence.split(" "))
    return _f1(len(union), hyp_size, ref_size)


def bleu4(reference: Sequence, hypothesis: Sequence) -> float:
    """nltk's sentence_bleu([reference], hypothesis) with weights 0.25 x 4 and
    SmoothingFunction().method3: an n-gram order with no match counts 1 / (2^k x its
    n-gram count), k = 1, 2, ... over such orders in turn."""
    hyp_len, ref_len = len(hypothesis), len(reference)
    precisions = []
    for n in range(1, 5):
        hyp_counts = Counter(tuple(hypothesis[i:i + n]) for i in range(hyp_len - n + 1))
        ref_counts = Counter(tuple(reference[i:i + n]) for i in range(ref_len - n + 1))
        matched = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        precisions.append((matched, max(1, sum(hyp_counts.values()))))
    if precisions[0][0] == 0:
        return 0.0
    smoothed, k = [], 1
    for matched, total in precisions:
        if matched == 0:
            smoothed.append(1 / (2 ** k * total))
            k += 1
        else:
            smoothed.append(matched / total)
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return penalty * math.exp(math.fsum(0.25 * math.log(p) for p in smoothed))


def row_scores(pred: str, label: str, cut: Callable[[str], list[str]]) -> dict[str, float] | None:
    """One row's four scores in [0, 1], or None for a row ms-swift does not score: an empty
    prediction or label, or one with no sentence left for rouge (only dots: rouge raises)."""
    hypothesis, reference = cut(pred), cut(label)
    if not hypothesis or not reference:
        return None
    hyp, ref = _sentences(" ".join(hypothesis)), _sentences(" ".join(reference))
    if not hyp or not ref:
        return None
    return {"rouge-1": rouge_n(hyp, ref, 1), "rouge-2": rouge_n(hyp, ref, 2), "rouge-l": rouge_l(hyp, ref),
            "bleu-4": bleu4(list(label), list(pred))}


def nlg_scores(preds: Sequence[str], labels: Sequence[str],
               cut: Callable[[str], list[str]] | None = None) -> tuple[dict[str, float], int]:
    """(means x 100 rounded to 6 places as ms-swift reports them, rows scored); a key is 0
    when no row could be scored (ms-swift's MeanMetric nan_value)."""
    cut = cut or segmenter()[1]
    sums, scored = dict.fromkeys(KEYS, 0.0), 0
    for pred, label in zip(preds, labels, strict=True):
        scores = row_scores(pred, label, cut)
        if scores is None:
            continue
        scored += 1
        for key in KEYS:
            sums[key] += scores[key]
    return {key: round(sums[key] / scored * 100, 6) if scored else 0.0 for key in KEYS}, scored
