"""Attention at the lengths people train at: the scores as BLAS products, and one fused Numba
pass over each row for everything between them.

Same math and mask description as `fastpath.attention` (the tiled kernel):

    x  = q k^T                         (B, K, G T, S)   one batched BLAS product (np.matmul)
    x  = softcap(x scale), masked      one pass per row (Numba), in place: -inf where hidden
    p  = softmax(x), lse = logsumexp(x)     ... the same pass, p into a second buffer
    o  = p v                           BLAS
backward (x and lse kept):
    dp = do v^T                        BLAS
    p  = exp(x - lse),  delta = rowsum(p dp)
    ds = p (dp - delta) (1 - (x / cap)^2) scale     one pass per row (Numba), ds over dp
    dv = p^T do,  dq = ds k,  dk = ds^T q            BLAS (the G query heads of a kv head summed
                                                     by the product itself)

Grouped-query attention costs nothing extra: the G query heads of a kv head are G T rows of
one product against that head's keys. x / cap is tanh of the scaled score, because the kept
x is cap tanh(.): the softcap's slope needs no second tanh.

Why two attention paths. The tiled kernel never holds a T x S array (memory linear in T) and
skips tiles a mask hides, but its 64 x 64 tile products run at 25-50 GFLOP/s, while OpenBLAS
reaches 110-250 on the same machine. At the lengths of a training step (T = S = 256) the
products are most of the work and nothing is skipped, so here they go to BLAS and only the
elementwise part is Numba's. Measured in the Small model's training step (B 8, H 8, T = S =
256, 24 attention calls forward and backward, cProfile, load 3.5-4.3): 1.4 s against 3.7 s
tiled. The price is a (B, H, T, S) array kept per layer for the backward, as the reference
and torch's eager attention keep. With method="auto" `fastpath.attention.attention_forward`
picks this path while that array stays within DENSE_BYTES and the tiles the tiled kernel
would skip are few (see `choose`); long sequences and narrow windows stay tiled.

Axes: B batch, H query heads, K kv heads, G = H/K, T queries, S keys (own + extra), Dh head
dim, R = G T rows per kv head.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .blas import chunks, one_blas_thread
from .jit import kernel, lanes, run_lanes
from .mathfn import exp, tanh

# Largest (B, H, T, S) scores array the dense path keeps per call: 64 MiB is Small's
# B 8 x H 8 at T = S = 512 in float32; a 24-layer step keeps one per attention layer.
DENSE_BYTES = 64 << 20
# The dense path computes every (query, key) pair, the tiled one only the tiles a mask lets
# through, at 1/4-1/2 of BLAS's speed (the bench's attention section: 25-50 GFLOP/s against
# 110-120 under load). Dense is chosen while its pairs are at most this many times the tiled
# kernel's.
DENSE_PAIRS_RATIO = 3.0
# Work is done in chunks of (batch, kv head) items whose scores take about this much
# memory, so that the row pass reads what BLAS just wrote while it is still in L2.
CHUNK_BYTES = 1 << 19
# Multiply-adds (B K R S Dh) from which the items are split over threads.
PARALLEL_WORK = 1 << 20


class DenseCache(NamedTuple):
    """What the dense backward needs: the inputs as the products read them, the kept
    masked and capped scores x and their row log-sum-exp. Items are (batch, kv head) pairs,
    i = b K + kh; R = G T rows each."""
    qg: np.ndarray          # (B K, R, Dh)
    k: np.ndarray           # (B K, S, Dh)
    v: np.ndarray           # (B K, S, Dh)
    x: np.ndarray           # (B K, R, S): cap tanh(q k^T scale / cap), -inf where hidden
    lse: np.ndarray         # (B K, R)
    kvalid: np.ndarray      # (B, S)
    scale: float
    cap: float              # 0 = no softcap
    shape: tuple            # (B, H, T, Dh) of q


# ---------------------------------------------------------------------------- kernels


# The row helpers take slices and loop from 0: a loop index that starts at a runtime value
# could be negative as far as LLVM knows, and NumPy's negative-index wraparound then keeps
# the loop scalar (measured: 2.6 ns per element instead of 0.2 for the softcap loop).


@kernel
def _scores(xr, kv, scale, cap, inv_cap, neg_inf):
    """A run of visible columns of a row: scale and softcap q.k (padded keys -> -inf)."""
    for c in range(xr.shape[0]):
        s = xr[c] * scale
        if cap > 0:
            s = cap * tanh(s * inv_cap)
        xr[c] = s if kv[c] else neg_inf


@kernel
def row_max(x, m):
    """max(m, max(x)) in eight running maxima. A single running max is a chain LLVM does
    not vectorise (it also stops the vectorisation of a loop it sits in: a softcap loop
    with the max inside measured 3.7 ns per element, 0.2 without); eight measured 0.13 ns
    per element against 0.37 for one."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = m
    n, c = x.shape[0], 0
    while c + 8 <= n:
        m0, m1, m2, m3 = max(m0, x[c]), max(m1, x[c + 1]), max(m2, x[c + 2]), max(m3, x[c + 3])
        m4, m5, m6, m7 = max(m4, x[c + 4]), max(m5, x[c + 5]), max(m6, x[c + 6]), max(m7, x[c + 7])
        c += 8
    for r in range(c, n):
        m0 = max(m0, x[r])
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@kernel
def _exps(xr, pr, m, zero, neg_inf, total):
    """p = exp(x - m) on a run of columns (exactly 0 on a padded key); returns total + their sum."""
    for c in range(xr.shape[0]):
        e = exp(xr[c] - m) if xr[c] > neg_inf else zero
        pr[c] = e
        total += e
    return total


@kernel
def _scale(x, f):
    for c in range(x.shape[0]):
        x[c] *= f


@kernel
def _softmax_rows(x, p, lse, kvalid, i0, K, lo, hi, n_own, scale, cap, consts):
    """Items i0, i0 + 1, ... of x (n, R, S): x holds q.k on entry and the capped, masked
    scores on exit (-inf where hidden); p the softmax (exactly 0 where hidden, and on a row
    that sees no key); lse the log-sum-exp of x (0 on such a row). Row r of an item is query
    r % T; it sees own keys lo..hi and the keys from n_own on (the extra keys), where
    kvalid allows. Only those two runs are computed; the rest is filled."""
    n, R, S = x.shape
    T = lo.shape[0]
    zero, one, neg_inf = consts
    inv_cap = one / cap if cap > 0 else cap
    for j in range(n):
        kv = kvalid[(i0 + j) // K]                            # the item's batch row
        for r in range(R):
            xr, pr, i = x[j, r], p[j, r], r % T               # row views taken once (see attention.py)
            a = min(max(lo[i], 0), n_own)
            b = max(min(hi[i] + 1, n_own), a)                 # own keys a .. b - 1 visible
            xr[:a] = neg_inf
            xr[b:n_own] = neg_inf
            pr[:a] = zero
            pr[b:n_own] = zero
            _scores(xr[a:b], kv[a:b], scale, cap, inv_cap, neg_inf)
            _scores(xr[n_own:], kv[n_own:], scale, cap, inv_cap, neg_inf)   # the extra keys
            m = row_max(xr[n_own:], row_max(xr[a:b], neg_inf))
            if m == neg_inf:                                  # sees no key: output 0, gradient 0
                pr[:] = zero
                lse[j, r] = zero
                continue
            total = _exps(xr[n_own:], pr[n_own:], m, zero, neg_inf, _exps(xr[a:b], pr[a:b], m, zero, neg_inf, zero))
            _scale(pr[a:b], one / total)
            _scale(pr[n_own:], one / total)
            lse[j, r] = m + np.log(total)


@kernel
def _softmax_grad_rows(x, lse, dp, p, scale, cap, consts):
    """x, dp, p (n, R, S), lse (n, R): p = exp(x - lse); ds over dp (the softmax's, the
    softcap's and the scaling's backward in one)."""
    n, R, S = x.shape
    zero, one, neg_inf = consts
    inv_cap = one / cap if cap > 0 else cap
    for j in range(n):
        for r in range(R):
            xr, pr, dr, l = x[j, r], p[j, r], dp[j, r], lse[j, r]
            delta = zero
            for c in range(S):
                e = exp(xr[c] - l) if xr[c] > neg_inf else zero
                pr[c] = e
                delta += e * dr[c]                            # rowsum(p dp) = rowsum(do o)
            if cap > 0:
                for c in range(S):
                    t = xr[c] * inv_cap                       # = tanh(score / cap); -inf where hidden
                    g = pr[c] * (dr[c] - delta) * (one - t * t) * scale
                    dr[c] = g if xr[c] > neg_inf else zero    # (0 * inf would be NaN)
            else:
                for c in range(S):
                    dr[c] = pr[c] * (dr[c] - delta) * scale

# ---------------------------------------------------------------------------- the lanes


def _consts(dt):
    return dt(0), dt(1), dt(-np.inf)


def _forward_lane(lane, n_lanes, qg, k, v, x, lse, o5, kvalid, lo, hi, n_own, scale, cap, per_chunk):
    """Items of this lane, a chunk at a time: x = q k^T, the row pass, o = p v (into o5,
    the output as (B, K, G, T, Dh), whatever its memory layout)."""
    dt = x.dtype.type
    B, K, G, T, Dh = o5.shape
    p = np.empty((per_chunk,) + x.shape[1:], x.dtype)         # one chunk's probabilities
    o = np.empty((per_chunk, G * T, Dh), x.dtype)             # ... and outputs
    for i0, i1 in chunks(lane, n_lanes, x.shape[0], per_chunk):
        n = i1 - i0
        np.matmul(qg[i0:i1], k[i0:i1].swapaxes(-1, -2), out=x[i0:i1])
        _softmax_rows(x[i0:i1], p[:n], lse[i0:i1], kvalid, i0, K, lo, hi, n_own, dt(scale), dt(cap), _consts(dt))
        np.matmul(p[:n], v[i0:i1], out=o[:n])
        for j in range(n):                                    # into place, while it is in cache
            o5[(i0 + j) // K, (i0 + j) % K] = o[j].reshape(G, T, Dh)


def _backward_lane(lane, n_lanes, c, do5, dq, dk, dv, per_chunk):
    """Items of this lane, a chunk at a time: dp = do v^T, the row pass, then dv, dq, dk.
    do5: the output's gradient as (B, K, G, T, Dh), whatever its memory layout."""
    dt = c.x.dtype.type
    B, K, G, T, Dh = do5.shape
    p, dp = (np.empty((per_chunk,) + c.x.shape[1:], c.x.dtype) for _ in range(2))
    do = np.empty((per_chunk, G * T, Dh), c.x.dtype)
    for i0, i1 in chunks(lane, n_lanes, c.x.shape[0], per_chunk):
        n = i1 - i0
        for j in range(n):
            do[j].reshape(G, T, Dh)[...] = do5[(i0 + j) // K, (i0 + j) % K]
        np.matmul(do[:n], c.v[i0:i1].swapaxes(-1, -2), out=dp[:n])
        _softmax_grad_rows(c.x[i0:i1], c.lse[i0:i1], dp[:n], p[:n], dt(c.scale), dt(c.cap), _consts(dt))
        np.matmul(p[:n].swapaxes(-1, -2), do[:n], out=dv[i0:i1])       # inverts o = p v
        np.matmul(dp[:n], c.k[i0:i1], out=dq[i0:i1])                    # dp now holds ds: x = q k^T ...
        np.matmul(dp[:n].swapaxes(-1, -2), c.qg[i0:i1], out=dk[i0:i1])  # ... for k, the G heads summed


def _split(n_items, R, S, Dh, itemsize):
    """(lanes, items per chunk) for n_items items of R x S scores."""
    per_chunk = max(1, CHUNK_BYTES // (R * S * itemsize))
    return (lanes(n_items) if n_items * R * S * Dh >= PARALLEL_WORK else 1), per_chunk

# ---------------------------------------------------------------------------- forward, backward


def attention_forward(q, k, v, scale, cap, kvalid, lo, hi, n_own, out=None):
    """o (B, H, T, Dh) and a DenseCache. q (B, H, T, Dh), k, v (B, K, S, Dh) of one float
    dtype (checked by the caller, fastpath.attention.attention_forward); kvalid (B, S) bool
    (False: a padded key), lo, hi (T,) each query's visible own keys, n_own the own keys
    (the last S - n_own are extra keys, visible to every query). out: where to write o, a
    (B, H, T, Dh) array in any layout (a view of merged heads (B, T, H Dh) saves a copy)."""
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    R = (H // K) * T
    qg = np.ascontiguousarray(q).reshape(B * K, R, Dh)       # the G heads of a kv head: G T rows
    k2, v2 = (np.ascontiguousarray(a).reshape(B * K, S, Dh) for a in (k, v))
    x = np.empty((B * K, R, S), q.dtype)
    lse = np.empty((B * K, R), q.dtype)
    o = np.empty((B, H, T, Dh), q.dtype) if out is None else out
    cap = 0.0 if cap is None else float(cap)
    n_lanes, per_chunk = _split(B * K, R, S, Dh, q.itemsize)
    with one_blas_thread():
        run_lanes(_forward_lane, n_lanes, qg, k2, v2, x, lse, o.reshape(B, K, H // K, T, Dh), kvalid, lo, hi, n_own,
                  scale, cap, per_chunk)
    return o, DenseCache(qg, k2, v2, x, lse, kvalid, float(scale), cap, (B, H, T, Dh))


def attention_backward(do, c: DenseCache):
    """dq (B, H, T, Dh), dk, dv (B, K, S, Dh) from do (B, H, T, Dh), in any layout."""
    (B, H, T, Dh), (BK, R, S) = c.shape, c.x.shape
    K = BK // B
    dq, dk, dv = np.empty_like(c.qg), np.empty_like(c.k), np.empty_like(c.v)
    n_lanes, per_chunk = _split(BK, R, S, Dh, c.x.itemsize)
    do5 = np.asarray(do, c.x.dtype).reshape(B, K, H // K, T, Dh)   # a view when do is one
    with one_blas_thread():
        run_lanes(_backward_lane, n_lanes, c, do5, dq, dk, dv, per_chunk)
    return dq.reshape(B, H, T, Dh), dk.reshape(B, K, S, Dh), dv.reshape(B, K, S, Dh)


def choose(B, H, T, S, itemsize, visible_tile_pairs):
    """"dense" or "tiled" for one call: dense while its kept scores fit DENSE_BYTES and it
    computes at most DENSE_PAIRS_RATIO times the pairs of the tiles the tiled kernel visits
    (visible_tile_pairs, per (batch, head))."""
    if B * H * T * S * itemsize > DENSE_BYTES:
        return "tiled"
    return "dense" if T * S <= DENSE_PAIRS_RATIO * visible_tile_pairs else "tiled"
