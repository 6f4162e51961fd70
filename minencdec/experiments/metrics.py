"""Scores and their uncertainty: accuracy, macro-F1, chrF, and bootstrap intervals.

    accuracy(pred, gold), macro_f1(pred, gold, n_classes)
    chrf(hypothesis, reference)                 character n-gram F-score (Popovic, 2015)
    bootstrap(per_example, stat)                a percentile interval over resampled examples
    paired_bootstrap(a, b, stat)                the same for the difference of two systems

The intervals resample *test examples* (with replacement, a fixed seed), which is the
uncertainty that comes from having only a few hundred of them; they say nothing of the
spread over training seeds. A paired interval resamples the same examples for both systems,
so what they share (an easy or hard example) cancels.
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError(f"predictions {pred.shape} and labels {gold.shape} must be the same non-empty shape")
    return float(np.mean(pred == gold))


def macro_f1(pred, gold, n_classes: int) -> float:
    """The mean over classes of F1 = 2 tp / (2 tp + fp + fn); a class absent from both the
    predictions and the labels scores 1 (nothing to get wrong)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    scores = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (gold == c))
        wrong = np.sum((pred == c) != (gold == c))                # fp + fn
        scores.append(1.0 if tp + wrong == 0 else 2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def _ngrams(text: str, n: int) -> Counter:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, max_n: int = 6, beta: float = 2.0) -> float:
    """chrF (Popovic, 2015): the character n-gram (n = 1..6) precision and recall, each
    averaged over n, combined as F_beta with beta = 2 (recall weighs more). Whitespace is
    removed first, as sacreBLEU's chrF does. In [0, 100]; identical strings score 100."""
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        if not h or not r:
            continue
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 100.0 if hyp == ref else 0.0
    p, r = np.mean(precisions), np.mean(recalls)
    return 0.0 if p + r == 0 else float(100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r))


def bootstrap(per_example, stat=np.mean, samples=2000, level=0.95, seed=0) -> tuple[float, float, float]:
    """(statistic, low, high): `stat` of the examples and its percentile interval over
    `samples` resamplings of them (rows of a 2-D array are resampled together)."""
    x = np.asarray(per_example)
    if len(x) == 0:
        raise ValueError("bootstrap needs at least one example")
    idx = np.random.default_rng(seed).integers(0, len(x), (samples, len(x)))
    values = np.array([stat(x[i]) for i in idx])
    tail = (1 - level) / 2 * 100
    return float(stat(x)), float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_bootstrap(a, b, stat=np.mean, samples=2000, level=0.95, seed=0) -> tuple[float, float, float]:
    """stat(a) - stat(b) with its interval, a and b scored on the same examples in the same
    order, resampled together."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired scores need the same examples: {a.shape[0]} vs {b.shape[0]}")
    return bootstrap(np.stack([a, b], axis=1), lambda x: stat(x[:, 0]) - stat(x[:, 1]), samples, level, seed)
