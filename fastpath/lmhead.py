"""The tied LM head, final softcap and cross-entropy, fused so no (N, V) logits are kept.

The reference computes, then keeps for the backward, the whole logits array (B, T, V):
    z = h E^T;  logits = cap tanh(z / cap);  loss = mean_valid(logsumexp(logits) - logits[target])
and its backward builds dlogits (B, T, V) again. With Gemma's 256k vocabulary that is the
largest array of a training step (batch 8 x 512 tokens: 4 GiB in float32).

Here rows go through in chunks of R (`chunk_rows`; by default R x V <= BUDGET), and each chunk's
gradient is formed at once, while its logits are in memory:

    z   = h_c E^T                                   (R, V)   BLAS
    dz  = (softmax(logits) - onehot(target)) / n * (1 - tanh^2)   in place over z (Numba)
    dh_c = dz E;  dE += dz^T h_c                    BLAS (dE in vocabulary blocks: no V x D temporary)

so the peak is one chunk of logits, not N x V. The loss's gradient w.r.t. h and E is
ready when the forward returns; the backward only scales it by dloss. Rows whose target
is `ignore_index` count in neither the loss nor the gradient; n is the number of the
others over the whole batch, as in `minencdec.model.losses.cross_entropy_forward` (which raises
when n = 0, and so does this).

Axes: N rows (B*T), D width, V vocab, R rows per chunk.
"""

from __future__ import annotations

import numpy as np
from minencdec.model.losses import IGNORE_INDEX

from .jit import kernel, lanes, run_lanes
from .mathfn import exp, tanh

# Logits per chunk by default: 64M numbers = 256 MiB in float32 (at least MIN_ROWS rows: BLAS
# is slow on thin products). Each chunk re-reads the table and adds into all of dtable, so
# fewer, larger chunks are faster on a large vocabulary: V = 262,144, N = 512, D = 640 took
# 5.7 s with 64-row chunks, 4.8 s with 256 (this budget) and 4.6 s with all 512 (one thread).
BUDGET = 1 << 26
MIN_ROWS = 64
_VOCAB_BLOCK = 8192    # rows of dE updated per product (the temporary is VOCAB_BLOCK x D)


@kernel
def _softmax_grad_lane(lane, n_lanes, z, targets, cap, inv_n, one, row_loss):
    """z (R, V): h E^T in, d loss / d z out (0 on ignored rows). row_loss (R,) float64:
    logsumexp(logits) - logits[target] (0 on ignored rows). targets < 0: ignored."""
    R, V = z.shape
    zero = one - one
    inv_cap = one / cap if cap > 0 else cap
    for i in range(lane, R, n_lanes):
        if cap > 0:
            for v in range(V):
                z[i, v] = cap * tanh(z[i, v] * inv_cap)       # the final softcap
        row_max = z[i, 0]
        for v in range(V):
            row_max = max(row_max, z[i, v])
        total = zero
        for v in range(V):
            total += exp(z[i, v] - row_max)
        lse = row_max + np.log(total)
        t = targets[i]
        if t < 0:                                             # ignored: no loss, no gradient
            row_loss[i] = 0.0
            z[i, :] = zero
            continue
        logit_t = z[i, t]
        row_loss[i] = lse - logit_t
        if cap > 0:                                           # (softmax - onehot) / n * softcap'
            for v in range(V):
                s = z[i, v] * inv_cap                         # = tanh(z / cap)
                z[i, v] = exp(z[i, v] - lse) * inv_n * (one - s * s)
            s = logit_t * inv_cap
            z[i, t] -= inv_n * (one - s * s)
        else:
            for v in range(V):
                z[i, v] = exp(z[i, v] - lse) * inv_n
            z[i, t] -= inv_n


def lm_head_cross_entropy(h, table, targets, cap, ignore_index=IGNORE_INDEX, need_grad=True, chunk_rows=None):
    """Mean cross-entropy of cap tanh(h table^T / cap) against targets, and the cache.

    h (..., D), table (V, D), targets (...) int (ignore_index = no loss), cap None or > 0.
    Returns (loss, cache); `lm_head_cross_entropy_backward(cache, dloss)` gives dh (..., D)
    and dtable (V, D). With need_grad=False only the loss is computed (cache None).
    chunk_rows: rows of logits alive at once; default max(MIN_ROWS, BUDGET // V)
    (V = 8192: 8192 rows, 256 MiB; V = 262,144: 256 rows, 256 MiB)."""
    h, table, targets = np.asarray(h), np.asarray(table), np.asarray(targets)
    if h.dtype not in (np.float32, np.float64) or table.dtype != h.dtype:
        raise TypeError(f"lm_head_cross_entropy: h and table must share float32 or float64, got {h.dtype}, {table.dtype}")
    if table.ndim != 2 or h.shape[-1] != table.shape[1] or targets.shape != h.shape[:-1]:
        raise ValueError(f"lm_head_cross_entropy: h {h.shape}, table {table.shape}, targets {targets.shape} disagree")
    V, D = table.shape
    h2 = np.ascontiguousarray(h).reshape(-1, D)               # (N, D)
    t = targets.reshape(-1).astype(np.int64)
    valid = t != ignore_index
    n = int(np.count_nonzero(valid))
    if n == 0:
        raise ValueError("labels: every target is -100, so the loss has no token to average over")
    if np.any((t[valid] < 0) | (t[valid] >= V)):
        raise ValueError(f"lm_head_cross_entropy: a target is outside [0, {V})")
    t = np.where(valid, t, -1)                                # the kernel's "ignored" marker
    dt = h.dtype.type
    N = h2.shape[0]
    R = max(1, min(N, chunk_rows or max(MIN_ROWS, BUDGET // V)))
    z = np.empty((R, V), h.dtype)                             # the one chunk of logits
    dh = np.empty_like(h2) if need_grad else None
    dtable = np.zeros_like(table) if need_grad else None
    tmp = np.empty((min(V, _VOCAB_BLOCK), D), h.dtype) if need_grad else None
    row_loss = np.empty(R, np.float64)
    total = 0.0
    for r0 in range(0, N, R):
        r1 = min(r0 + R, N)
        zc, hc = z[:r1 - r0], h2[r0:r1]
        np.matmul(hc, table.T, out=zc)                        # z = h E^T
        run_lanes(_softmax_grad_lane, lanes(r1 - r0), zc, t[r0:r1], dt(0 if cap is None else cap), dt(1.0 / n),
                  dt(1), row_loss[:r1 - r0])
        total += float(np.sum(row_loss[:r1 - r0]))
        if need_grad:
            np.matmul(zc, table, out=dh[r0:r1])               # dh = dz E       inverts z = h E^T for h
            for v0 in range(0, V, _VOCAB_BLOCK):              # dE += dz^T h    ... and for E
                v1 = min(v0 + _VOCAB_BLOCK, V)
                np.matmul(zc[:, v0:v1].T, hc, out=tmp[:v1 - v0])
                dtable[v0:v1] += tmp[:v1 - v0]
    loss = dt(total / n)
    return loss, ([dh.reshape(h.shape), dtable] if need_grad else None)


def lm_head_cross_entropy_backward(cache, dloss=1.0):
    """dh (..., D) and dtable (V, D): the gradients the forward formed, times dloss. With
    dloss 1 these are the forward's own arrays, handed over rather than copied (the models
    add the embedding's other uses into dtable in place), so a cache serves one backward:
    a second call is an error rather than a silently changed result."""
    if not cache:
        raise ValueError("lm_head_cross_entropy_backward: this cache was used by an earlier backward "
                         "(its gradient arrays were handed over); run the forward again")
    dh, dtable = cache
    cache.clear()
    if dloss == 1.0:
        return dh, dtable
    return dh * dh.dtype.type(dloss), dtable * dtable.dtype.type(dloss)
