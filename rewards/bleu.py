"""Character-level sentence BLEU, as UniCTokens' evaluation scores VQA / text-only answers.

Equivalent to ``nltk.translate.bleu_score.sentence_bleu([list(reference)], list(hypothesis),
weights=(0.7, 0.3), smoothing_function=SmoothingFunction().method1)`` (one reference, characters as tokens,
clipped n-gram precision, brevity penalty against the reference length, method-1 smoothing: a zero n-gram
count becomes epsilon = 0.1 over the denominator; no unigram match at all scores 0). Own implementation
so that nltk is not a dependency.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

__all__ = ["char_bleu", "sentence_bleu"]


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu(reference: Sequence, hypothesis: Sequence, weights: Sequence[float] = (0.7, 0.3),
                  epsilon: float = 0.1) -> float:
    """BLEU of ``hypothesis`` against one ``reference`` (token sequences), method-1 smoothing."""
    numerators, denominators = [], []
    for n in range(1, len(weights) + 1):
        hyp = _ngrams(hypothesis, n)
        ref = _ngrams(reference, n)
        numerators.append(sum(min(c, ref[g]) for g, c in hyp.items()))
        denominators.append(max(1, sum(hyp.values())))
    if numerators[0] == 0:
        return 0.0
    hyp_len, ref_len = len(hypothesis), len(reference)
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    log_p = [math.log((num if num else epsilon) / den) for num, den in zip(numerators, denominators)]
    return bp * math.exp(math.fsum(w * lp for w, lp in zip(weights, log_p)))


def char_bleu(reference: str, hypothesis: str, weights: Sequence[float] = (0.7, 0.3)) -> float:
    """Character-level BLEU of an answer against the reference answer (UniCTokens' eval metric)."""
    return sentence_bleu(list(reference), list(hypothesis), weights)
