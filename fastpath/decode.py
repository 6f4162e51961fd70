"""The decode step's attention: a few new query rows (usually one) against a KV cache.

Same math and mask description as `fastpath.attention.attention_forward`, forward only:
during generation nothing is differentiated, so no log-sum-exp is kept and there are no
tiles. Each query row scores its visible keys into a buffer of length S, takes the softmax
and sums the values: O(S) memory per row, never T x S.

    self-attention step:   decode_attention(q, keys, values, scale, cap, causal=True,
                               window=w, key_mask=valid, q_offset=q_pos - first_key_pos)
    cross-attention step:  decode_attention(q, enc_k, enc_v, scale, cap, key_mask=enc_mask)
    merged step (T5Gemma 2): decode_attention(q, [keys | enc_k], [values | enc_v], scale, cap,
                               causal=True, window=w, key_mask=valid, q_offset=...,
                               extra_keys=S_enc, extra_key_mask=enc_mask)

A row scores two ranges of keys: its interval [lo, hi] of own keys, then every extra key
(the encoder's, after the own keys); no other key is touched.

(minencdec.model.generate: q_offset = q_slots[0] - slots[0], key_mask = cache.valid[:, slots].)

One step's attention is little arithmetic (B=1, 8 heads, 256 keys, Dh=64: 0.5 MFLOP) and
reads the whole cache once, so it is bound by memory bandwidth, as NumPy's batched
matrix-vector products are: measured here, 40 us against 96 us for the reference at 64
keys, 88 against 117 at 256, 296 against 329 at 1024 (the reference's dense-mask
construction, 65 us, comes on top). Splitting the heads over two threads cost more than
it saved up to 1024 keys (the hand-off is 60-100 us on this machine under load), so only
calls with B H T S Dh >= PARALLEL_WORK (B=1, 8 heads, Dh=64: 8192 keys) are split.

Axes: B batch, H query heads, K kv heads, G = H/K, T new rows, S cached keys.
"""

from __future__ import annotations

import numpy as np

from minencdec.model import attention as reference

from .attention import _covered
from .masks import _check_description, _check_shapes, dense_mask, visible_intervals
from .jit import kernel, lanes, run_lanes
from .mathfn import exp, tanh

PARALLEL_WORK = 1 << 22     # B H T S Dh from which the heads are split over threads


@kernel
def _decode_lane(lane, n_lanes, q, k, v, kvalid, lo, hi, x0, scale, cap, consts, o):
    """(batch, head) items lane, lane + n_lanes, ...: every new row of that head. Row i sees
    keys lo[i] .. hi[i] and x0 .. S - 1 (the extra keys; x0 = S: none), kvalid permitting."""
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scores = np.empty(S, q.dtype)
    zero, one, neg_inf = consts
    inv_cap = one / cap if cap > 0 else cap
    for item in range(lane, B * H, n_lanes):
        b, h = item // H, item % H
        kh = h // G                                           # GQA: the kv head of query head h
        for i in range(T):
            o[b, h, i, :] = zero
            row_max = neg_inf
            n_own = max(hi[i] + 1 - lo[i], 0)
            n_seen = n_own + S - x0
            for jj in range(n_seen):                          # the visible interval, then the extra keys
                j = lo[i] + jj if jj < n_own else x0 + jj - n_own
                dot = zero
                for d in range(Dh):                           # (2-D indexing, not row views:
                    dot += q[b, h, i, d] * k[b, kh, j, d]     #  a view per key costs a refcount)
                x = dot * scale
                if cap > 0:
                    x = cap * tanh(x * inv_cap)               # softcap before the mask
                x = x if kvalid[b, j] else neg_inf            # padding
                scores[j] = x
                row_max = max(row_max, x)
            if row_max == neg_inf:
                continue                                      # sees no key: output 0
            total = zero
            for jj in range(n_seen):
                j = lo[i] + jj if jj < n_own else x0 + jj - n_own
                x = scores[j]
                p = exp(x - row_max) if x > neg_inf else zero
                scores[j] = p
                total += p
            for jj in range(n_seen):
                j = lo[i] + jj if jj < n_own else x0 + jj - n_own
                p = scores[j]
                for d in range(Dh):
                    o[b, h, i, d] += p * v[b, kh, j, d]
            inv = one / total
            for d in range(Dh):
                o[b, h, i, d] *= inv


def decode_attention(q, k, v, scale, cap=None, causal=False, window=None, rule="le", key_mask=None, q_offset=0,
                     extra_keys=0, extra_key_mask=None):
    """o (B, H, T, Dh) for q (B, H, T, Dh) against cached k, v (B, K, S, Dh); the mask
    description as in fastpath.attention (query i at position q_offset + i, own key j at j,
    the last extra_keys keys seen by every query unless extra_key_mask hides them)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    _check_description(causal, window, rule, q_offset, extra_keys)
    _check_shapes(q, k, v, key_mask, extra_keys, extra_key_mask)
    B, H, T, Dh = q.shape
    S = k.shape[2]
    n = S - int(extra_keys)                                   # own keys, then the extra keys
    if not _covered(q, k, v):
        mask = dense_mask(T, S, causal, window, rule, key_mask, q_offset, extra_keys, extra_key_mask)
        return reference.attention_forward(q, k, v, mask, scale, cap)[0]
    dt = q.dtype.type
    kvalid = np.ones((B, S), dtype=bool)
    if key_mask is not None:
        kvalid[:, :n] = np.asarray(key_mask) != 0
    if extra_key_mask is not None:
        kvalid[:, n:] = np.asarray(extra_key_mask) != 0
    lo, hi = visible_intervals(T, n, causal, window, rule, int(q_offset))
    o = np.empty((B, H, T, Dh), q.dtype)
    n_lanes = lanes(B * H) if B * H * T * S * Dh >= PARALLEL_WORK else 1
    run_lanes(_decode_lane, n_lanes, np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v),
              kvalid, lo, hi, n, dt(scale), dt(0 if cap is None else cap), (dt(0), dt(1), dt(-np.inf)), o)
    return o
