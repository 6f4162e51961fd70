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
(the encoder's, after the own keys), each without its leading and trailing padding; no
other key is touched. A batch's (row, head) items are taken by the lanes in turn (`claim`).

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

import threading

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from minencdec.model import attention as reference

from .attention import _covered
from .masks import _check_description, _check_shapes, dense_mask, visible_intervals
from .jit import jit_enabled, kernel, lanes, run_lanes
from .mathfn import exp, tanh

PARALLEL_WORK = 1 << 22     # B H T S Dh from which the heads are split over threads

# ---------------------------------------------------------------------------- shared work


@intrinsic
def claim(typingctx, counter):
    """The next work item: counter[0] += 1 atomically, returning the value before. The lanes
    of a decode-step kernel take their items this way instead of a fixed share each, so a
    lane the scheduler holds back (another job on the other core) leaves the items it has
    not started to the others. An item is one lane's whole work, whichever lane: results
    do not depend on the number of lanes (fastpath/decoder.py's LaneChoice relies on it)."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [ir.Constant(ir.IntType(64), 0)])
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(counter), codegen


_claim_lock = threading.Lock()


def _py_claim(counter):
    with _claim_lock:
        counter[0] += 1
        return int(counter[0]) - 1


if not jit_enabled():        # an intrinsic cannot run as Python
    claim = _py_claim        # noqa: F811


def counter():
    """A fresh work counter for one call of a kernel that claims its items."""
    return np.zeros(1, np.int64)


@kernel
def _read(a, first, n, seen):
    """seen + the sum of rows a[first .. first + n): one plain pass, which brings them into
    the cache at the memory's full speed (see _decode_lane)."""
    for j in range(first, first + n):
        for d in range(a.shape[1]):
            seen += a[j, d]
    return seen


@kernel
def _scores(qi, kb, first, n, scores, at):
    """scores[at + jj] = qi . kb[first + jj] for jj < n: four keys per pass, so each load of
    q feeds four dot products."""
    Dh = qi.shape[0]
    z = qi.dtype.type(0)
    for jj in range(0, n - n % 4, 4):
        j = first + jj
        s0 = s1 = s2 = s3 = z
        for d in range(Dh):                                   # (2-D indexing, not row views:
            s0 += qi[d] * kb[j, d]                            #  a view per key costs a refcount)
            s1 += qi[d] * kb[j + 1, d]
            s2 += qi[d] * kb[j + 2, d]
            s3 += qi[d] * kb[j + 3, d]
        scores[at + jj], scores[at + jj + 1], scores[at + jj + 2], scores[at + jj + 3] = s0, s1, s2, s3
    for jj in range(n - n % 4, n):
        s0 = z
        for d in range(Dh):
            s0 += qi[d] * kb[first + jj, d]
        scores[at + jj] = s0


@kernel
def _add_weighted(p, at, vb, first, n, acc):
    """acc += sum_jj p[at + jj] vb[first + jj] for jj < n, four value rows per pass (one load
    and store of acc per four rows)."""
    Dh = acc.shape[0]
    for jj in range(0, n - n % 4, 4):
        j = first + jj
        p0, p1, p2, p3 = p[at + jj], p[at + jj + 1], p[at + jj + 2], p[at + jj + 3]
        for d in range(Dh):
            acc[d] += p0 * vb[j, d] + p1 * vb[j + 1, d] + p2 * vb[j + 2, d] + p3 * vb[j + 3, d]
    for jj in range(n - n % 4, n):
        for d in range(Dh):
            acc[d] += p[at + jj] * vb[first + jj, d]


@kernel
def _capped_masked(scores, first, n, ok, scale, cap, inv_cap, neg_inf):
    """scores[first .. first + n) scaled, softcapped (cap > 0) before the mask, and masked
    where ok[jj] is False. No max is taken here: a max reduction in the same loop kept
    LLVM from vectorising it (it needs no-NaN fast-math, which the kernels never set), and
    tanh ran one element at a time."""
    if cap > 0:
        for jj in range(n):
            x = cap * tanh(scores[first + jj] * scale * inv_cap)
            scores[first + jj] = x if ok[jj] else neg_inf
    else:
        for jj in range(n):
            scores[first + jj] = scores[first + jj] * scale if ok[jj] else neg_inf


@kernel
def _trimmed(ok, first, n):
    """(first, n) of the keys first .. first + n - 1 without their leading and trailing
    masked keys: a padded row's (left-padded prompts, right-padded encoder inputs). They
    would add exp(-inf) = 0 to the softmax, so skipping them changes nothing but the reads."""
    while n > 0 and not ok[first]:
        first += 1
        n -= 1
    while n > 0 and not ok[first + n - 1]:
        n -= 1
    return first, n


@kernel
def _decode_lane(lane, n_lanes, q, k, v, kvalid, lo, hi, x0, scale, cap, consts, o, items):
    """The (batch, head) items this lane claims from `items`: every new row of that head.
    Row i sees keys lo[i] .. hi[i] and x0 .. S - 1 (the extra keys; x0 = S: none), kvalid
    permitting. Its scores are packed into one buffer (own keys, then extra keys), so every
    pass over them is a plain loop that vectorises."""
    B, H, T, Dh = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scores = np.empty(S, q.dtype)
    acc = np.empty(Dh, q.dtype)
    zero, one, neg_inf = consts
    inv_cap = one / cap if cap > 0 else cap
    seen = zero
    while True:
        item = claim(items)                                   # (batch, head) items, taken in turn
        if item >= B * H:
            break
        b, h = item // H, item % H
        kb, vb, ok = k[b, h // G], v[b, h // G], kvalid[b]   # GQA: the kv head of query head h
        e0, n_extra = _trimmed(ok, x0, S - x0)
        for i in range(T):
            qi = q[b, h, i]
            first, n_own = _trimmed(ok, lo[i], max(hi[i] + 1 - lo[i], 0))
            n = n_own + n_extra
            # The keys and values are first read straight through (this kv head's first query
            # only), as the few-rows product reads its weights (fastpath/decoder.py): loads
            # that miss the cache amid the arithmetic are served slower. Measured on batch 8's
            # cross-attention keys (8 layers, 64 MiB), 3.7 -> 3.4 ms on one core; wasted when
            # they are cached already (0.15 -> 0.35 ms a layer), which in a decode step they
            # never are: the step's 112 MiB of weights pass through the cache in between.
            if i == 0 and h % G == 0:
                seen = _read(kb, e0, n_extra, _read(kb, first, n_own, seen))
            _scores(qi, kb, first, n_own, scores, 0)          # the visible interval, then the extra keys
            _scores(qi, kb, e0, n_extra, scores, n_own)
            _capped_masked(scores, 0, n_own, ok[first:first + n_own], scale, cap, inv_cap, neg_inf)
            _capped_masked(scores, n_own, n_extra, ok[e0:e0 + n_extra], scale, cap, inv_cap, neg_inf)
            row_max = neg_inf
            for jj in range(n):
                row_max = max(row_max, scores[jj])
            if row_max == neg_inf:
                o[b, h, i, :] = zero                          # sees no key: output 0
                continue
            total = zero
            for jj in range(n):
                x = scores[jj]
                p = exp(x - row_max) if x > neg_inf else zero
                scores[jj] = p
                total += p
            if i == 0 and h % G == 0:
                seen = _read(vb, e0, n_extra, _read(vb, first, n_own, seen))
            acc[:] = zero
            _add_weighted(scores, 0, vb, first, n_own, acc)
            _add_weighted(scores, n_own, vb, e0, n_extra, acc)
            inv = one / total
            for d in range(Dh):
                o[b, h, i, d] = acc[d] * inv
    return seen


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
              kvalid, lo, hi, n, dt(scale), dt(0 if cap is None else cap), (dt(0), dt(1), dt(-np.inf)), o, counter())
    return o
