"""Tiled attention with an online softmax (flash-attention), forward and backward, in Numba.

Same math as `minencdec.model.attention.attention_forward/backward`:

    o = softmax(softcap(q k^T * scale) masked) v         softcap(s) = cap tanh(s / cap)

but the mask is a *description* instead of a (B, T, S) array, and no T x S matrix is ever
held: queries are cut into tiles of BQ rows and keys into tiles of BK, and each query tile
walks the key tiles it can see, keeping per row a running max m, a running sum l and an
unnormalised output (the online softmax):

    s   = softcap(q_tile k_tile^T * scale), masked keys -> -inf      (BQ, BK)
    m'  = max(m, rowmax(s));  p = exp(s - m');  c = exp(m - m')
    l   = c l + rowsum(p);    acc = c acc + p v_tile;  m = m'
    o   = acc / l,            lse = m + log l  (saved for the backward)

The backward recomputes each tile's p = exp(s - lse) from the saved lse instead of keeping
it, and uses rowsum(dp * p) = rowsum(do * o) = delta (one number per query row):

    dv += p^T do;  dp = do v^T;  ds = p (dp - delta) (1 - tanh^2) scale
    dk += ds^T q;  dq += ds k

Memory is O(T + S) per head (the tiles and lse), against O(T S) for the reference. At the
lengths of a training step the models hand the call to dense.py instead (the scores as BLAS
products, 2-5x faster there): method="auto", which the backend switch passes, chooses by size
(dense.choose).

The mask description (the fields of `minencdec.model.attention.Mask`): query i sits at
position q_offset + i, own key j at position j.
    causal, window None     j <= i                    (decoder self-attention)
    causal, window w        i - w < j <= i            (w keys including itself)
    not causal, window None every key                 (encoder, cross-attention)
    not causal, window w    |i - j| <= w (rule "le", transformers 5) or < w (rule "lt"),
                            or -((w - 1) // 2) <= j - i <= w // 2 (rule "t5gemma2")
    key_mask (B, n)         False/0 own keys are hidden (padding), on top of the above
    extra_keys E            T5Gemma 2's merged attention: the last E of the S keys (the
                            encoder's) follow the n = S - E own keys; every query sees each
                            of them unless extra_key_mask (B, E) marks it as padding
For every one of these, the own keys a query sees form one interval [lo_i, hi_i] (before
the padding), and lo_i, hi_i never decrease with i: that is what lets a tile be skipped
whole. The extra keys get tiles of their own (tiles.tile_keys: own keys from tile 0, extra
keys from tile xt on, no tile mixes the two), in which every row's interval is the whole
tile: a query tile walks its own-key tiles, then every extra tile that holds a real key.
A query that sees no key gets output 0 and sends back zero gradients, like the reference.
For a sliding KV cache whose first kept key sits at absolute position p0, pass positions
relative to it: q_offset = (absolute position of query 0) - p0.

Work split: the forward's work items are (batch, head, query tile), the backward's are
(batch, kv head, key tile); each backward item owns its dk, dv tile and adds its share of
dq into a per-lane buffer (lanes x the size of q), summed at the end. GQA: a kv tile is
loaded once for its H/K query heads.

Axes: B batch, H query heads, K kv heads, G = H/K, T queries, S keys, Dh head dim,
Dp = Dh rounded up to 4, BQ / BK tile sizes, nqt / nkt tile counts.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from minencdec.model import attention as reference

from . import dense
from .jit import kernel, lanes, run_lanes
from .masks import _check_description, _check_shapes, _dense_validity, _key_validity, _tile_bounds, _tiled_pairs
from .masks import visible_intervals
from .masks import dense_mask  # noqa: F401  (public here: the tests and the benchmark use it)
from .mathfn import exp, tanh
from .tiles import _round4, _transpose_tiles, _untile, mm_nn, mm_tn, tile_keys, tile_rows, untile_keys

BLOCK = 64          # default BQ and BK: a 64 x 64 float32 score tile is 16 KiB, half of L1
_DTYPES = (np.float32, np.float64)

# ---------------------------------------------------------------------------- kernels


@kernel
def _forward_row_unmasked(srow, scale, cap, inv_cap, consts, m, l, acc, r):
    """_forward_row for a row that sees every key of its tile: the same arithmetic, no mask
    (measured: 8 us instead of 17 us per 64 x 64 float32 tile)."""
    zero, one, neg_inf = consts
    n = srow.shape[0]
    if cap > 0:
        for c in range(n):
            srow[c] = cap * tanh(srow[c] * scale * inv_cap)
    else:
        for c in range(n):
            srow[c] = srow[c] * scale
    row_max = neg_inf
    for c in range(n):
        row_max = max(row_max, srow[c])
    m_new = max(m[r], row_max)
    rescale = exp(m[r] - m_new) if m[r] > neg_inf else zero
    total = zero
    for c in range(n):
        p = exp(srow[c] - m_new)
        srow[c] = p
        total += p
    l[r] = l[r] * rescale + total
    m[r] = m_new
    if rescale != one:
        for d in range(acc.shape[1]):
            acc[r, d] *= rescale


@kernel
def _forward_row(srow, j0, lo, hi, kvalid, full, scale, cap, inv_cap, consts, m, l, acc, r):
    """One row of a score tile: softcap, mask, online-softmax update of m[r], l[r], acc[r].
    srow holds q.k on entry and the unnormalised probabilities p on exit. full: every key
    of the tile is real (no padding, no tail past S)."""
    zero, one, neg_inf = consts
    n = srow.shape[0]
    c_lo, c_hi = max(lo - j0, 0), min(hi - j0, n - 1)         # visible columns, before padding
    if c_lo > c_hi:
        srow[:] = zero
        return
    if full and c_lo == 0 and c_hi == n - 1:                  # nothing masked: loops without selects
        _forward_row_unmasked(srow, scale, cap, inv_cap, consts, m, l, acc, r)   # vectorise 2x better
        return
    if cap > 0:
        for c in range(n):
            x = cap * tanh(srow[c] * scale * inv_cap)         # softcap comes before the mask
            srow[c] = x if (c >= c_lo) & (c <= c_hi) & kvalid[j0 + c] else neg_inf
    else:
        for c in range(n):
            x = srow[c] * scale
            srow[c] = x if (c >= c_lo) & (c <= c_hi) & kvalid[j0 + c] else neg_inf
    row_max = neg_inf
    for c in range(n):
        row_max = max(row_max, srow[c])
    if row_max == neg_inf:                                    # every key of this tile is padding
        srow[:] = zero
        return
    m_new = max(m[r], row_max)
    rescale = exp(m[r] - m_new) if m[r] > neg_inf else zero   # the old terms shrink by e^(m - m')
    total = zero
    for c in range(n):
        x = srow[c]
        p = exp(x - m_new) if x > neg_inf else zero           # masked keys are exactly 0
        srow[c] = p
        total += p
    l[r] = l[r] * rescale + total
    m[r] = m_new
    if rescale != one:
        for d in range(acc.shape[1]):
            acc[r, d] *= rescale


@kernel
def _forward_lane(lane, n_lanes, Qt, KT, Vt, kvalid, ktile, lo, hi, tlo, thi, xt, T, scale, cap, consts, o, lse):
    """Every n_lanes-th (batch, head, query tile) item from `lane` on (round-robin).
    Key tiles xt and later hold extra keys (module notes). consts = (0, 1, -inf) in the
    arrays' dtype: a bare 0 or 1.0 in a kernel is int64 or float64, and float32 * float64
    would turn the whole loop into float64."""
    B, H, nqt, BQ, Dp = Qt.shape
    K, nkt, BK = KT.shape[1], KT.shape[2], KT.shape[4]
    G, Dh = H // K, o.shape[3]
    x_lo, x_hi = xt * BK, nkt * BK - 1                        # every row's interval in an extra tile
    n_items = B * H * nqt
    inv_cap = consts[1] / cap if cap > 0 else cap
    s = np.empty((BQ, BK), Qt.dtype)                          # scores, then probabilities
    acc = np.empty((BQ, Dp), Qt.dtype)                        # unnormalised output
    m = np.empty(BQ, Qt.dtype)                                # running row max
    l = np.empty(BQ, Qt.dtype)                                # running row sum
    for item in range(lane, n_items, n_lanes):                # round-robin over the lanes
        b, h, qt = item // (H * nqt), item // nqt % H, item % nqt
        if item // nqt % 2:                                   # serpentine: with a causal mask the late
            qt = nqt - 1 - qt                                 # tiles cost more, and plain round-robin
                                                              # gave one lane every odd tile (6:4 at nqt 4)
        kh = h // G                                           # GQA: the kv head of query head h
        i0 = qt * BQ
        rows = min(BQ, T - i0)
        rows4 = (rows + 3) // 4 * 4
        m[:] = consts[2]
        l[:] = 0
        acc[:] = 0
        # Views taken once per item: each view of a shared array costs an atomic reference
        # count that the two lanes contend for (measured: the backward scaled 1.25x on two
        # threads with views per row, 1.5x with them hoisted).
        q_tile, k_b, v_b, kv_b, kt_b = Qt[b, h, qt], KT[b, kh], Vt[b, kh], kvalid[b], ktile[b]
        t_own = tlo[qt] // BK
        n_own = max(thi[qt] // BK + 1 - t_own, 0)             # the own-key tiles it can see,
        for step in range(n_own + nkt - xt):                  # then every extra-key tile
            t = t_own + step if step < n_own else xt + step - n_own
            if not kt_b[t]:
                continue
            s[:rows4] = 0
            mm_nn(q_tile, k_b[t], s, rows4, Dp, BK)           # s = q k^T
            full, extra = kt_b[t] == 2, t >= xt
            for r in range(rows):
                _forward_row(s[r], t * BK, x_lo if extra else lo[i0 + r], x_hi if extra else hi[i0 + r], kv_b,
                             full, scale, cap, inv_cap, consts, m, l, acc, r)
            mm_nn(s, v_b[t], acc, rows4, BK, Dp)              # acc += p v
        for r in range(rows):
            if l[r] > 0:
                inv = consts[1] / l[r]
                for d in range(Dh):
                    o[b, h, i0 + r, d] = acc[r, d] * inv
                lse[b, h, i0 + r] = m[r] + np.log(l[r])
            else:                                             # a query that sees no key
                o[b, h, i0 + r, :] = 0
                lse[b, h, i0 + r] = 0


@kernel
def _backward_row(srow, dprow, prow, dsrow, j0, lo, hi, kvalid, full, scale, cap, inv_cap, consts, lse_r, delta_r):
    """One row: p = exp(softcap(s) - lse) on visible keys; ds = p (dp - delta) softcap' scale."""
    zero, one, _ = consts
    n = srow.shape[0]
    c_lo, c_hi = max(lo - j0, 0), min(hi - j0, n - 1)
    if c_lo > c_hi:
        prow[:] = zero
        dsrow[:] = zero
        return
    if full and c_lo == 0 and c_hi == n - 1:                  # nothing masked: the loops without selects
        if cap > 0:
            for c in range(n):
                th = tanh(srow[c] * scale * inv_cap)
                p = exp(cap * th - lse_r)
                prow[c] = p
                dsrow[c] = p * (dprow[c] - delta_r) * (one - th * th) * scale
        else:
            for c in range(n):
                p = exp(srow[c] * scale - lse_r)
                prow[c] = p
                dsrow[c] = p * (dprow[c] - delta_r) * scale
        return
    if cap > 0:
        for c in range(n):
            th = tanh(srow[c] * scale * inv_cap)
            p = exp(cap * th - lse_r) if (c >= c_lo) & (c <= c_hi) & kvalid[j0 + c] else zero
            prow[c] = p
            dsrow[c] = p * (dprow[c] - delta_r) * (one - th * th) * scale  # inverts softmax, softcap, scaling
    else:
        for c in range(n):
            p = exp(srow[c] * scale - lse_r) if (c >= c_lo) & (c <= c_hi) & kvalid[j0 + c] else zero
            prow[c] = p
            dsrow[c] = p * (dprow[c] - delta_r) * scale


@kernel
def _backward_lane(lane, n_lanes, Qt, dOt, KT, Kt, VT, kvalid, ktile, lo, hi, tlo, thi, xt, lse, delta, T,
                   scale, cap, consts, dq_part, dk_t, dv_t):
    """Every n_lanes-th (batch, kv head, key tile) item from `lane` on; dq_part[lane] is its own.
    An extra-key tile (t >= xt) is seen by every query tile."""
    dq = dq_part[lane]
    B, H, nqt, BQ, Dp = Qt.shape
    K, nkt, BK = KT.shape[1], KT.shape[2], KT.shape[4]
    G = H // K
    x_lo, x_hi = xt * BK, nkt * BK - 1
    n_items = B * K * nkt
    inv_cap = consts[1] / cap if cap > 0 else cap
    s = np.empty((BQ, BK), Qt.dtype)
    dp = np.empty((BQ, BK), Qt.dtype)
    p = np.zeros((BQ, BK), Qt.dtype)
    ds = np.zeros((BQ, BK), Qt.dtype)
    for item in range(lane, n_items, n_lanes):
        b, kh, t = item // (K * nkt), item // nkt % K, item % nkt
        if item // nkt % 2:                                   # serpentine, as in _forward_lane
            t = nkt - 1 - t
        if not ktile[b, t]:
            continue                                          # dk, dv of padding stay 0
        j0, extra = t * BK, t >= xt
        j_last = j0 + BK - 1
        dk_tile, dv_tile = dk_t[b, kh, t], dv_t[b, kh, t]     # this item's own output tiles
        k_tile, kT_tile, vT_tile = KT[b, kh, t], Kt[b, kh, t], VT[b, kh, t]
        kv_b, full = kvalid[b], ktile[b, t] == 2              # views once per item (see _forward_lane)
        for g in range(G):
            h = kh * G + g
            lse_h, delta_h, dq_h, q_h, do_h = lse[b, h], delta[b, h], dq[b, h], Qt[b, h], dOt[b, h]
            for qt in range(nqt):
                if not extra and (tlo[qt] > j_last or thi[qt] < j0):
                    continue                                  # no row of this tile sees these keys
                i0 = qt * BQ
                rows = min(BQ, T - i0)
                rows4 = (rows + 3) // 4 * 4
                s[:rows4] = 0
                q_tile, do_tile = q_h[qt], do_h[qt]
                mm_nn(q_tile, k_tile, s, rows4, Dp, BK)          # recompute s = q k^T
                dp[:rows4] = 0
                mm_nn(do_tile, vT_tile, dp, rows4, Dp, BK)       # dp = do v^T
                p[rows:rows4] = 0
                ds[rows:rows4] = 0
                for r in range(rows):
                    _backward_row(s[r], dp[r], p[r], ds[r], j0, x_lo if extra else lo[i0 + r],
                                  x_hi if extra else hi[i0 + r], kv_b, full, scale, cap, inv_cap, consts,
                                  lse_h[i0 + r], delta_h[i0 + r])
                mm_tn(p, do_tile, dv_tile, BK, rows4, Dp)        # dv += p^T do
                mm_tn(ds, q_tile, dk_tile, BK, rows4, Dp)        # dk += ds^T q
                mm_nn(ds, kT_tile, dq_h[qt], rows4, BK, Dp)      # dq += ds k

# ---------------------------------------------------------------------------- public wrappers


class FlashCache(NamedTuple):
    """What the backward needs: the tiled inputs, the output and its per-row log-sum-exp."""
    Qt: np.ndarray                                            # (B, H, nqt, BQ, Dp)
    KT: np.ndarray                                            # (B, K, nkt, Dp, BK)
    Vt: np.ndarray                                            # (B, K, nkt, BK, Dp)
    o: np.ndarray                                             # (B, H, T, Dh)
    lse: np.ndarray                                           # (B, H, T)
    kvalid: np.ndarray                                        # (B, nkt * BK) bool: a real key (padding, tails are False)
    ktile: np.ndarray                                         # (B, nkt) int8: 0 no real key in the tile, 1 some, 2 all
    lo: np.ndarray                                            # (T,) first visible own key of each query
    hi: np.ndarray                                            # (T,) last visible own key
    tlo: np.ndarray                                           # (nqt,) smallest lo of a query tile
    thi: np.ndarray                                           # (nqt,) largest hi
    S: int                                                    # keys in all
    n_own: int                                                # own keys (S - extra_keys)
    xt: int                                                   # the first extra-key tile (nkt: none)
    scale: float
    cap: float                                                # 0 = no softcap


def _consts(dt):
    return dt(0), dt(1), dt(-np.inf)


def _covered(*arrays):
    """True when the kernels handle these arrays: one dtype, float32 or float64."""
    dt = arrays[0].dtype
    return dt in _DTYPES and all(a.dtype == dt for a in arrays)


METHODS = ("auto", "dense", "tiled")


def attention_forward(q, k, v, scale, cap=None, causal=False, window=None, rule="le",
                      key_mask=None, q_offset=0, extra_keys=0, extra_key_mask=None, block=None, method="tiled",
                      out=None):
    """softmax(softcap(q k^T * scale) masked) v, masked by a description (module notes).

    q (B, H, T, Dh), k and v (B, K, S, Dh) with H a multiple of K; key_mask (B, S - extra_keys)
    or None; extra_key_mask (B, extra_keys) or None. Returns o (B, H, T, Dh) and the cache
    for `attention_backward`. method: "tiled" (this module's kernel), "dense" (the scores as
    BLAS products, fastpath/dense.py) or "auto" (dense.choose decides by size; the backend
    switch asks for it). `block` = (BQ, BK), the tile sizes (default 64, 64; rounded up to
    multiples of 4; the tests use small ones). out: an optional (B, H, T, Dh) array, in any
    layout, that receives o (the dense path writes into it directly: a view of merged heads
    saves a copy). Arrays that are not all float32 or all float64 go to the reference with a
    dense mask."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    _check_description(causal, window, rule, q_offset, extra_keys)
    _check_shapes(q, k, v, key_mask, extra_keys, extra_key_mask)
    if cap is not None and not cap > 0:
        raise ValueError(f"cap must be None or > 0, got {cap!r}")
    if method not in METHODS:
        raise ValueError(f"attention: method must be one of {METHODS}, got {method!r}")
    B, H, T, Dh = q.shape
    S, E = k.shape[2], int(extra_keys)
    n = S - E                                                 # own keys, then E extra keys
    if not _covered(q, k, v):
        mask = dense_mask(T, S, causal, window, rule, key_mask, q_offset, E, extra_key_mask)
        o, c = reference.attention_forward(q, k, v, mask, scale, cap)
        return _into(out, o), ("reference", c)
    dt = q.dtype.type
    lo, hi = visible_intervals(T, n, causal, window, rule, int(q_offset))
    if method == "auto":
        method = dense.choose(B, H, T, S, q.itemsize, _tiled_pairs(lo, hi, n, E))
    if method == "dense":
        return dense.attention_forward(q, k, v, scale, cap, _dense_validity(B, n, E, key_mask, extra_key_mask),
                                       lo, hi, n, out)
    block = block or (BLOCK, BLOCK)
    BQ, BK = min(_round4(block[0]), _round4(T)), min(_round4(block[1]), _round4(max(n, E)))
    Dp, nqt, xt = _round4(Dh), -(-T // BQ), -(-n // BK)
    nkt = xt + -(-E // BK)
    tlo, thi = _tile_bounds(lo, hi, n, nqt, BQ)
    kvalid, ktile = _key_validity(B, n, E, xt, nkt, BK, key_mask, extra_key_mask)
    Qt = tile_rows(q, nqt, BQ, Dp)                            # (B, H, nqt, BQ, Dp)
    KT = _transpose_tiles(tile_keys(k, n, xt, nkt, BK, Dp))   # (B, K, nkt, Dp, BK)
    Vt = tile_keys(v, n, xt, nkt, BK, Dp)                     # (B, K, nkt, BK, Dp)
    o = np.empty((B, H, T, Dh), q.dtype)
    lse = np.empty((B, H, T), q.dtype)
    cap_ = dt(0 if cap is None else cap)
    run_lanes(_forward_lane, lanes(B * H * nqt), Qt, KT, Vt, kvalid, ktile, lo, hi, tlo, thi, xt, T, dt(scale),
              cap_, _consts(dt), o, lse)
    return _into(out, o), FlashCache(Qt, KT, Vt, o, lse, kvalid, ktile, lo, hi, tlo, thi, S, n, xt, scale, float(cap_))


def _into(out, o):
    if out is None:
        return o
    out[...] = o
    return out


def attention_backward(do, cache):
    """dq (B, H, T, Dh), dk, dv (B, K, S, Dh) from do (B, H, T, Dh)."""
    if isinstance(cache, dense.DenseCache):
        return dense.attention_backward(do, cache)
    if not isinstance(cache, FlashCache):                     # ("reference", cache): a fallback
        return reference.attention_backward(do, cache[1])
    c = cache
    do = np.asarray(do)
    if do.shape != c.o.shape:
        raise ValueError(f"attention_backward: do has shape {do.shape}, the output had {c.o.shape}")
    if do.dtype != c.o.dtype:
        do = do.astype(c.o.dtype)
    dt = c.o.dtype.type
    B, H, nqt, BQ, Dp = c.Qt.shape
    K, nkt, BK = c.KT.shape[1], c.KT.shape[2], c.KT.shape[4]
    T, Dh = c.o.shape[2], c.o.shape[3]
    delta = np.sum(do * c.o, axis=-1)                         # (B, H, T) = rowsum(dp * p)
    dOt = tile_rows(do, nqt, BQ, Dp)
    Kt, VT = _transpose_tiles(c.KT), _transpose_tiles(c.Vt)   # (B, K, nkt, BK, Dp), (.., Dp, BK)
    n_lanes = lanes(B * K * nkt)
    dq_part = np.zeros((n_lanes, B, H, nqt, BQ, Dp), c.o.dtype)
    dk_t = np.zeros((B, K, nkt, BK, Dp), c.o.dtype)
    dv_t = np.zeros((B, K, nkt, BK, Dp), c.o.dtype)
    run_lanes(_backward_lane, n_lanes, c.Qt, dOt, c.KT, Kt, VT, c.kvalid, c.ktile, c.lo, c.hi, c.tlo, c.thi, c.xt,
              c.lse, delta, T, dt(c.scale), dt(c.cap), _consts(dt), dq_part, dk_t, dv_t)
    dq = dq_part[0] if n_lanes == 1 else dq_part.sum(axis=0)
    return _untile(dq, T, Dh), untile_keys(dk_t, c.n_own, c.xt, c.S, Dh), untile_keys(dv_t, c.n_own, c.xt, c.S, Dh)
