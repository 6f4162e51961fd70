"""Token cross-entropy with an ignore index, forward and backward.

loss = mean over tokens whose target != -100 of  logsumexp(z) - z[target],
the mean transformers takes (reduction "mean" over non-ignored tokens).

Axes: N tokens (any leading shape), V vocab.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def log_softmax(z):
    """log softmax over the last axis, stable: shift by the row max first."""
    shifted = z - np.max(z, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def cross_entropy_forward(logits, targets, ignore_index=IGNORE_INDEX):
    """logits (..., V), targets (...) int -> scalar loss (logits' dtype) and cache.

    A batch with no target token at all has no mean: that is an error here (transformers
    returns NaN), so a training run never continues on a silent NaN."""
    valid = targets != ignore_index                              # (...)
    n = int(np.count_nonzero(valid))
    if n == 0:
        raise ValueError("labels: every target is -100, so the loss has no token to average over")
    logp = log_softmax(logits)                                   # (..., V)
    safe = np.where(valid, targets, 0)
    picked = np.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]   # (...)
    loss = -np.sum(np.where(valid, picked, 0.0)) / n
    return loss, (logp, safe, valid, n)


def cross_entropy_backward(cache, dloss=1.0):
    """dL/dlogits = (softmax - onehot(target)) / n on labelled tokens, 0 elsewhere."""
    logp, safe, valid, n = cache
    dlogits = np.exp(logp)                                       # softmax, (..., V)
    np.put_along_axis(dlogits, safe[..., None], np.take_along_axis(dlogits, safe[..., None], -1) - 1.0, -1)
    return dlogits * (valid[..., None] * (dloss / n))
