"""The attention block with its projections fused: one matrix product for q, k and v, and one
Numba pass from that product to the heads attention reads, forward and backward.

Same signatures as `minencdec.model.attention.attention_block_forward/backward`, the
readable definition:

    reference (per projection)                  here
    q = x Wq^T, k = x Wk^T, v = x Wv^T          P = x [Wq; Wk; Wv]^T           one BLAS call
    split heads, QK-norm, RoPE (5-8 passes)     q, k, v = heads(P)             one pass (Numba)
    attention, then merge heads (a copy)        attention writes o merged      (dense path)
    y = o Wo^T                                  the same
backward:
    do = dy Wo, split heads (a copy)            do read in place (a strided view)
    RoPE^T, QK-norm^T, merge (per projection)   dP = heads^T(dq, dk, dv)       one pass
    dx = dq Wq + dk Wk + dv Wv, three dW        dx = dP [Wq; Wk; Wv], dW = dP^T x   two BLAS calls

Self-attention's x feeds queries, keys and values, so its dx comes back whole: the
backward returns dsource None (stack.py adds nothing). Cross-attention (T5Gemma) projects
the queries from x and keys and values from the encoder output ([Wk; Wv] in one product);
T5Gemma 2's merged attention projects the encoder output with the same [Wk; Wv] (k-normed,
no RoPE) into the key rows after the decoder's own. The weights are concatenated per call
(3 MiB for a Small layer: far less than one pass over the activations).

What the heads pass does per row of Dh numbers (a head of one token), as the reference:
    QK-norm (Gemma 3)  y = x / sqrt(mean(x^2) + eps) * (1 + w)        rstd kept
    RoPE               y = y cos + rotate_half(y) sin                  rotate_half([a, b]) = [-b, a]
and its backward, in reverse: RoPE^T (dy cos + rotate_half^T(dy sin)), then the RMSNorm
backward with xhat recomputed from P and the kept rstd.

Axes: B batch, T queries, S source keys, M memory keys, D width, H, K heads, Dh head dim,
N = B T rows, C = (H + 2K) Dh projected columns.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from minencdec.model import attention as reference

from . import attention as fattn
from .jit import kernel, lanes, run_lanes

# Rows (tokens x heads) from which the heads passes are split over threads.
PARALLEL_ROWS = 1 << 12


# ---------------------------------------------------------------------------- the heads pass


# The heads kernels index whole arrays (P as (B, L, heads, Dh)) rather than taking a view
# per row: a row is only Dh numbers, and views, slice copies and slices from a runtime start
# cost more than the arithmetic (measured: 1.1-1.3 ns per element with views, 0.17-0.33
# without; NumPy's own transposing copy 0.14).


@kernel
def _heads_lane(lane, n_lanes, P4, g0, w1, eps, cos, sin, out, l0, rstd):
    """out[b, h, l0 + l] = RoPE(QK-norm(P4[b, l, g0 + h])) for every (b, h, l) of this lane.
    P4 (B, L, heads, Dh); out (B, n, Lo, Dh); w1 (Dh,) = 1 + the norm's weight, or empty (no
    norm); cos, sin (1 or B, L, Dh), or empty (no RoPE); rstd (B, n, L) receives 1 / rms."""
    B, L, _, Dh = P4.shape
    n = out.shape[1]
    half = Dh // 2
    one = P4.dtype.type(1)
    norm, rope = w1.shape[0] > 0, cos.shape[1] > 0
    y = np.empty(Dh, P4.dtype)
    rows = B * n * L
    for item in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
        b, h, l = item // (n * L), item // L % n, item % L
        hh, ll = g0 + h, l0 + l
        if norm:
            ss = one - one
            for d in range(Dh):
                ss += P4[b, l, hh, d] * P4[b, l, hh, d]
            r = one / np.sqrt(ss / Dh + eps)
            rstd[b, h, l] = r
            for d in range(Dh):
                y[d] = P4[b, l, hh, d] * r * w1[d]
        else:
            for d in range(Dh):
                y[d] = P4[b, l, hh, d]
        if rope:                                              # [a, b] -> [a cos - b sin, b cos + a sin]
            bc = b % cos.shape[0]
            for d in range(half):
                out[b, h, ll, d] = y[d] * cos[bc, l, d] - y[d + half] * sin[bc, l, d]
            for d in range(half):
                out[b, h, ll, d + half] = y[d + half] * cos[bc, l, d + half] + y[d] * sin[bc, l, d + half]
        else:
            for d in range(Dh):
                out[b, h, ll, d] = y[d]


@kernel
def _heads_back_lane(lane, n_lanes, dout, l0, P4, g0, w1, rstd, cos, sin, dP4, dw_part):
    """The backward of _heads_lane: dP4[b, l, g0 + h] from dout[b, h, l0 + l]; this lane's
    share of the norm weight's gradient into dw_part[lane]."""
    B, L, _, Dh = P4.shape
    n = dout.shape[1]
    half = Dh // 2
    one = P4.dtype.type(1)
    norm, rope = w1.shape[0] > 0, cos.shape[1] > 0
    g = np.empty(Dh, P4.dtype)
    rows = B * n * L
    for item in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
        b, h, l = item // (n * L), item // L % n, item % L
        hh, ll = g0 + h, l0 + l
        if rope:                                              # RoPE^T: dy cos + rotate_half^T(dy sin)
            bc = b % cos.shape[0]
            for d in range(half):
                g[d] = dout[b, h, ll, d] * cos[bc, l, d] + dout[b, h, ll, d + half] * sin[bc, l, d + half]
            for d in range(half):
                g[d + half] = dout[b, h, ll, d + half] * cos[bc, l, d + half] - dout[b, h, ll, d] * sin[bc, l, d]
        else:
            for d in range(Dh):
                g[d] = dout[b, h, ll, d]
        if norm:                                              # the RMSNorm backward, xhat = P rstd
            r = rstd[b, h, l]
            dot = one - one
            for d in range(Dh):
                xh = P4[b, l, hh, d] * r
                dw_part[lane, d] += g[d] * xh
                dot += g[d] * w1[d] * xh
            mean = dot / Dh
            for d in range(Dh):
                dP4[b, l, hh, d] = r * (g[d] * w1[d] - P4[b, l, hh, d] * r * mean)
        else:
            for d in range(Dh):
                dP4[b, l, hh, d] = g[d]


_EMPTY = {np.dtype(np.float32): np.empty((0, 0, 0), np.float32), np.dtype(np.float64): np.empty((0, 0, 0), np.float64)}


def _rope3(rope, L, dt):
    """cos, sin as (1 or B, L, Dh) arrays, or empty ones for no RoPE."""
    if rope is None:
        return _EMPTY[dt], _EMPTY[dt]
    return tuple(np.ascontiguousarray(np.asarray(t, dt).reshape(-1, L, t.shape[-1])) for t in rope)


def _norm1(w_norm, dt):
    return np.empty(0, dt) if w_norm is None else (1 + np.asarray(w_norm, dt))


def heads(P, c0, n, Dh, w_norm, eps, rope, out=None, l0=0):
    """The heads [c0 / Dh, c0 / Dh + n) of P (B, L, C), QK-normed (w_norm not None) and
    rotated (rope = (cos, sin)), as (B, n, L, Dh); or written into out[:, :, l0:l0 + L].
    Returns the heads and rstd (B, n, L) (empty without a norm)."""
    B, L, _ = P.shape
    dt = P.dtype
    out = np.empty((B, n, L, Dh), dt) if out is None else out
    rstd = np.empty((B, n, L) if w_norm is not None else (0, 0, 0), dt)
    cos, sin = _rope3(rope, L, dt)
    w1 = _norm1(w_norm, dt)
    rows = B * n * L
    run_lanes(_heads_lane, lanes(rows) if rows >= PARALLEL_ROWS else 1, P.reshape(B, L, -1, Dh), c0 // Dh, w1,
              dt.type(eps or 0), cos, sin, out, l0, rstd)
    return out, rstd


def heads_backward(dout, l0, P, c0, w_norm, rstd, rope, dP):
    """Writes the gradient of P's columns [c0, c0 + n Dh) into dP from dout[:, :, l0:l0 + L];
    returns the norm weight's gradient (None without a norm)."""
    B, L, _ = P.shape
    n, Dh = dout.shape[1], dout.shape[3]
    dt = P.dtype
    cos, sin = _rope3(rope, L, dt)
    rows = B * n * L
    n_lanes = lanes(rows) if rows >= PARALLEL_ROWS else 1
    dw_part = np.zeros((n_lanes, Dh), dt)
    rstd = _EMPTY[dt] if rstd is None else rstd
    if w_norm is not None and rstd.shape != (B, n, L):           # the kernel does not check its indices
        raise ValueError(f"heads_backward: rstd {rstd.shape} is not the forward's (B, n, L) = {(B, n, L)}")
    run_lanes(_heads_back_lane, n_lanes, np.ascontiguousarray(dout), l0, P.reshape(B, L, -1, Dh), c0 // Dh,
              _norm1(w_norm, dt), rstd, cos, sin, dP.reshape(B, L, -1, Dh), dw_part)
    return None if w_norm is None else dw_part.sum(axis=0)


# ---------------------------------------------------------------------------- the block


class FusedCache(NamedTuple):
    x2: np.ndarray              # (N, D) the queries' input (and keys' for self-attention)
    s2: np.ndarray | None       # (Ns, Ds) cross-attention's source, None for self-attention
    m2: np.ndarray | None       # (Nm, D) merged attention's memory, or None
    w: dict
    P: np.ndarray               # (B, T, C) self-attention's projection, or (B, T, H Dh) queries
    Pkv: np.ndarray | None      # (B, S, 2 K Dh) cross-attention's keys and values
    Pm: np.ndarray | None       # (B, M, 2 K Dh) the memory's keys and values
    rstd: tuple                 # q, k (and memory k) norms' rstd (empty without QK-norm)
    rope: tuple | None
    attn: tuple                 # the attention's cache
    o: np.ndarray               # (B, T, H Dh) merged heads
    shape: tuple                # (H, K, Dh, S self keys, hidden memory shape or None)
    attend_backward: object     # the attention's backward


def _covered(x, *ws):
    return x.dtype in (np.float32, np.float64) and all(w.dtype == x.dtype for w in ws)


def attention_block_forward(x, source, w, mask, n_heads, n_kv, scale, cap, rope=None, kernels=None, eps=None,
                            memory=None):
    """attention.attention_block_forward with the projections fused (module notes). kernels:
    the backend's Kernels record, whose attention_forward/backward it calls (None: this
    package's)."""
    arrays = [x, source] + [w[n] for n in w] + ([] if memory is None else [memory])
    if not isinstance(mask, reference.Mask) or not _covered(*arrays):
        y, c = reference.attention_block_forward(x, source, w, mask, n_heads, n_kv, scale, cap, rope, kernels, eps,
                                                 memory)
        return y, ("reference", c)
    hidden = None
    if memory is not None and mask.extra_key_mask is not None and not np.any(mask.extra_key_mask):
        hidden, memory = memory.shape, None                   # no query sees it: self-attention (as the reference)
        mask = mask._replace(extra_keys=0, extra_key_mask=None)
    B, T, D = x.shape
    H, K = n_heads, n_kv
    Dh = w["q_proj"].shape[0] // H
    x2 = x.reshape(B * T, D)
    w_kv = np.concatenate([w["k_proj"], w["v_proj"]])          # (2 K Dh, Ds)
    self_attn = source is x
    s2 = Pkv = m2 = Pm = None
    if self_attn:
        P = (x2 @ np.concatenate([w["q_proj"], w_kv]).T).reshape(B, T, -1)   # (B, T, C)
        Pkv, kc, S = P, H * Dh, T
    else:
        S = source.shape[1]
        s2 = source.reshape(B * S, -1)
        P = (x2 @ w["q_proj"].T).reshape(B, T, H * Dh)
        Pkv, kc = (s2 @ w_kv.T).reshape(B, S, 2 * K * Dh), 0
    M = 0 if memory is None else memory.shape[1]
    k = np.empty((B, K, S + M, Dh), x.dtype)
    v = np.empty((B, K, S + M, Dh), x.dtype)
    q, rq = heads(P, 0, H, Dh, w.get("q_norm"), eps, rope)
    _, rk = heads(Pkv, kc, K, Dh, w.get("k_norm"), eps, rope, k)
    heads(Pkv, kc + K * Dh, K, Dh, None, None, None, v)
    rm = None
    if memory is not None:                                    # its keys after the own ones: no RoPE
        m2 = memory.reshape(B * M, D)
        Pm = (m2 @ w_kv.T).reshape(B, M, 2 * K * Dh)
        _, rm = heads(Pm, 0, K, Dh, w.get("k_norm"), eps, None, k, S)
        heads(Pm, K * Dh, K, Dh, None, None, None, v, S)
    o = np.empty((B, T, H * Dh), x.dtype)
    o_heads = o.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)    # (B, H, T, Dh), a view: attention writes merged
    if kernels is None:
        attn_c = fattn.attention_forward(q, k, v, scale, cap, method="auto", out=o_heads, **mask._asdict())[1]
    else:
        attn_c = kernels.attention_forward(q, k, v, mask, scale, cap, out=o_heads)[1]
    y = (o.reshape(B * T, H * Dh) @ w["o_proj"].T).reshape(B, T, D)
    return y, FusedCache(x2, s2, m2, w, P, None if self_attn else Pkv, Pm, (rq, rk, rm), rope, attn_c, o,
                         (H, K, Dh, S, hidden), fattn.attention_backward if kernels is None else kernels.attention_backward)


def attention_block_backward(dy, cache):
    """dx, dsource (None for self-attention: folded into dx), dmemory (None without memory),
    {name: dW}, as attention.attention_block_backward."""
    if not isinstance(cache, FusedCache):
        return reference.attention_block_backward(dy, cache[1])
    c = cache
    H, K, Dh, S, hidden = c.shape
    B, T = c.o.shape[:2]
    dy2 = dy.reshape(B * T, -1)
    dws = {"o_proj": dy2.T @ c.o.reshape(B * T, H * Dh)}    # inverts y = o Wo^T
    do = (dy2 @ c.w["o_proj"]).reshape(B, T, H, Dh).transpose(0, 2, 1, 3)   # (B, H, T, Dh), a view
    dq, dk, dv = c.attend_backward(do, c.attn)                # inverts the attention
    rq, rk, rm = c.rstd
    dP = np.empty_like(c.P)
    dws["q_norm"] = heads_backward(dq, 0, c.P, 0, c.w.get("q_norm"), rq, c.rope, dP)
    self_attn = c.s2 is None
    Pkv, dPkv, kc = (c.P, dP, H * Dh) if self_attn else (c.Pkv, np.empty_like(c.Pkv), 0)
    dws["k_norm"] = heads_backward(dk, 0, Pkv, kc, c.w.get("k_norm"), rk, c.rope, dPkv)
    heads_backward(dv, 0, Pkv, kc + K * Dh, None, None, None, dPkv)
    w_kv = np.concatenate([c.w["k_proj"], c.w["v_proj"]])
    if self_attn:                                             # x fed q, k and v: one product each way
        dP2 = dP.reshape(B * T, -1)
        dx = dP2 @ np.concatenate([c.w["q_proj"], w_kv])       # inverts P = x W^T for x ...
        dW = dP2.T @ c.x2                                     # ... and for W, split below
        dws.update(q_proj=dW[:H * Dh], k_proj=dW[H * Dh:(H + K) * Dh], v_proj=dW[(H + K) * Dh:])
        dsource = None
    else:
        dP2, dPkv2 = dP.reshape(B * T, -1), dPkv.reshape(B * S, -1)
        dx, dws["q_proj"] = dP2 @ c.w["q_proj"], dP2.T @ c.x2
        dsource, dW = (dPkv2 @ w_kv).reshape(B, S, -1), dPkv2.T @ c.s2
        dws.update(k_proj=dW[:K * Dh], v_proj=dW[K * Dh:])
    dmemory = None if hidden is None else np.zeros(hidden, dy.dtype)
    if c.m2 is not None:                                      # the memory's keys: same weights, summed
        M = c.Pm.shape[1]
        dPm = np.empty_like(c.Pm)
        dkn = heads_backward(dk, S, c.Pm, 0, c.w.get("k_norm"), rm, None, dPm)
        heads_backward(dv, S, c.Pm, K * Dh, None, None, None, dPm)
        dPm2 = dPm.reshape(B * M, -1)
        dmemory = (dPm2 @ w_kv).reshape(B, M, -1)
        dWm = dPm2.T @ c.m2
        dws["k_proj"], dws["v_proj"] = dws["k_proj"] + dWm[:K * Dh], dws["v_proj"] + dWm[K * Dh:]
        if dkn is not None:
            dws["k_norm"] = dws["k_norm"] + dkn
    return dx.reshape(B, T, -1), dsource, dmemory, {n: g for n, g in dws.items() if g is not None}
