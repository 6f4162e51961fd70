"""Token losses with an ignore index, forward and backward: cross-entropy and distillation.

Cross-entropy: loss = mean over tokens whose target != -100 of  logsumexp(z) - z[target],
the mean transformers takes (reduction "mean" over non-ignored tokens).

Distillation (the paper's PrefixLM objective, arXiv 2504.06225 section 3): cross-entropy against
the teacher's distribution, the teacher being the decoder-only model run on the same tokens,
mixed with the ground-truth cross-entropy:

    p    = softmax(teacher / T)                      the teacher's soft targets
    q    = softmax(student / T)
    loss = alpha T^2 mean_tokens[ -sum_v p_v log q_v ] + (1 - alpha) CE(student, targets)

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
    # The scale is cast to the logits' dtype: a float64 factor would turn a float32 backward
    # into float64, and NumPy's matmul of mixed dtypes leaves BLAS (about 100x slower).
    return dlogits * (valid[..., None] * np.asarray(dloss / n, dtype=dlogits.dtype))


def distillation_forward(student_logits, teacher_logits, targets, temperature=1.0, alpha=1.0,
                         ignore_index=IGNORE_INDEX):
    """student_logits, teacher_logits (..., V), targets (...) int -> scalar loss and cache.

    The soft term is cross-entropy, not KL: the two differ by the teacher's entropy, which
    does not depend on the student, so they have the same gradient. It is multiplied by T^2
    (Hinton et al. 2015): d/dz of the soft term is (q - p) / T, so without the T^2 factor
    the soft gradient would shrink like 1/T^2 for large T (q - p itself ~ 1/T); with it, the
    gradient scale stays comparable across temperatures and alpha keeps its meaning.
    Tokens whose target is `ignore_index` count in neither term; both are means over the
    same labelled tokens. The teacher is a constant: it gets no gradient.
    """
    student_logits, teacher_logits = np.asarray(student_logits), np.asarray(teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation: student logits {student_logits.shape} and teacher logits "
                         f"{teacher_logits.shape} differ in shape; run the teacher on the same tokens")
    if np.shape(targets) != student_logits.shape[:-1]:
        raise ValueError(f"distillation: targets {np.shape(targets)} do not match the logits "
                         f"{student_logits.shape} without their vocab axis")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distillation: temperature must be a positive number, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation: alpha (the weight of the teacher term) must be in [0, 1], got {alpha}")
    valid = targets != ignore_index                                        # (...)
    n = int(np.count_nonzero(valid))
    if n == 0:
        raise ValueError("labels: every target is -100, so the loss has no token to average over")
    T = temperature
    logp = log_softmax(teacher_logits / T)                                 # (..., V) teacher
    logq = log_softmax(student_logits / T)                                 # (..., V) student
    p = np.exp(logp)                                                       # (..., V)
    soft = -np.sum(p * logq, axis=-1)                                      # (...) per-token CE
    soft_loss = np.sum(np.where(valid, soft, 0.0)) / n
    hard_loss, ce_cache = cross_entropy_forward(student_logits, targets, ignore_index)
    loss = alpha * T**2 * soft_loss + (1.0 - alpha) * hard_loss
    return loss, (p, logq, valid, n, T, alpha, ce_cache, student_logits.dtype)


def distillation_backward(cache, dloss=1.0):
    """dL/dstudent_logits (..., V), in the student's dtype.

    Soft term: d/dz [-sum_v p_v log q_v] with q = softmax(z / T) is (q - p) / T (p sums to 1);
    times the forward's alpha T^2 / n this is alpha T (q - p) / n on labelled tokens.
    Hard term: (1 - alpha) times cross_entropy_backward."""
    p, logq, valid, n, T, alpha, ce_cache, dtype = cache
    dsoft = (np.exp(logq) - p) * (valid[..., None] * (alpha * T * dloss / n))  # inverts soft_loss
    dhard = cross_entropy_backward(ce_cache, (1.0 - alpha) * dloss)           # inverts hard_loss
    return (dsoft + dhard).astype(dtype, copy=False)
