"""Attention: the masks, softmax attention with GQA and softcapping, and the attention block.

A mask is a boolean array, True where query i may see key j, of shape (B, T, S) (or one
that broadcasts to it). Masked scores become -inf and the softmax is safe on a row with
no visible key: that query's output and gradients are exactly zero.

Axes: B batch, T query length, S key length, D model width, H query heads, K kv heads,
G = H / K queries per kv head, Dh head dim.

The batched products are einsums, whose index strings name the axes. They are also faster
here than batched matmul, which makes one small BLAS call per (batch, head): with a
multi-threaded BLAS on a busy machine each call can stall for milliseconds (measured on a
shared 2-core machine: 0.9 s for a (16, 4) batch of 128x32 @ 32x128, 7 ms as an einsum).
"""

from __future__ import annotations

import numpy as np

from .layers import linear_backward, linear_forward, rope_backward, rope_forward, \
    softcap_backward, softcap_forward

# ---------------------------------------------------------------------------- masks


def causal_mask(T, window=None, offset=0):
    """(T, offset + T): query i (at position offset + i) sees key j iff j <= i and, with a
    window w, i - w < j (w keys including itself)."""
    i = np.arange(T)[:, None] + offset
    j = np.arange(offset + T)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def bidirectional_mask(T, window=None, rule="le"):
    """(T, T): every key visible; with a window, |i - j| <= w (rule "le", transformers >= 5)
    or |i - j| < w (rule "lt", transformers 4.53-4.57 and the JAX code)."""
    distance = np.abs(np.arange(T)[:, None] - np.arange(T)[None, :])
    if window is None:
        return np.ones((T, T), dtype=bool)
    return distance <= window if rule == "le" else distance < window


def with_key_padding(mask, key_mask):
    """Combine a (T, S) pattern with key padding (B, S) (1 = real token) -> (B, T, S)."""
    if key_mask is None:
        return mask[None]
    return mask[None] & (np.asarray(key_mask) != 0)[:, None, :]


# ---------------------------------------------------------------------------- softmax attention


def attention_forward(q, k, v, mask, scale, cap):
    """softmax(softcap(q k^T * scale) masked) v.

    q (B, H, T, Dh), k and v (B, K, S, Dh), mask (B, T, S) bool -> o (B, H, T, Dh).
    Query head h reads kv head h // G (grouped-query attention; K = 1 is multi-query)."""
    B, H, T, Dh = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, T, Dh)                          # (B, K, G, T, Dh)
    s = np.einsum("bkgtd,bksd->bkgts", qg, k) * scale             # (B, K, G, T, S)
    s, cap_c = softcap_forward(s, cap)                           # softcap comes before the mask
    visible = mask[:, None, None]                                # (B, 1, 1, T, S)
    s = np.where(visible, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)                  # (B, K, G, T, 1)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)       # a fully masked row has max -inf
    e = np.exp(s - row_max)                                      # exp(-inf) = 0 on masked keys
    den = np.sum(e, axis=-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)                          # (B, K, G, T, S); empty rows stay 0
    o = np.einsum("bkgts,bksd->bkgtd", p, v)                     # (B, K, G, T, Dh)
    return o.reshape(B, H, T, Dh), (qg, k, v, p, cap_c, scale)


def attention_backward(do, cache):
    qg, k, v, p, cap_c, scale = cache
    B, K, G, T, Dh = qg.shape
    dog = do.reshape(B, K, G, T, Dh)                             # (B, K, G, T, Dh)
    dv = np.einsum("bkgts,bkgtd->bksd", p, dog)                  # (B, K, S, Dh)  inverts o = p v; G heads share v
    dp = np.einsum("bkgtd,bksd->bkgts", dog, v)                  # (B, K, G, T, S)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))       # inverts the softmax; masked keys get 0
    ds = softcap_backward(ds, cap_c) * scale                     # inverts the softcap and the scaling
    dq = np.einsum("bkgts,bksd->bkgtd", ds, k).reshape(B, K * G, T, Dh)   # (B, H, T, Dh)  inverts s = q k^T
    dk = np.einsum("bkgts,bkgtd->bksd", ds, qg)                  # (B, K, S, Dh)  sums the G heads
    return dq, dk, dv


# ---------------------------------------------------------------------------- the attention block


def _split_heads(x, n):
    B, T, _ = x.shape
    return x.reshape(B, T, n, -1).transpose(0, 2, 1, 3)          # (B, T, n*Dh) -> (B, n, T, Dh)


def _merge_heads(x):
    B, n, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n * Dh)         # (B, n, T, Dh) -> (B, T, n*Dh)


def attention_block_forward(x, source, w, mask, n_heads, n_kv, scale, cap, rope=None):
    """o_proj(attention(q_proj(x), k_proj(source), v_proj(source))).

    Self-attention passes source = x and rope = (cos, sin); cross-attention passes the
    encoder output as source and rope = None (no RoPE). w holds "q_proj", "k_proj",
    "v_proj", "o_proj" weights. x (B, T, D), source (B, S, Ds) -> y (B, T, D)."""
    q_lin, q_c = linear_forward(x, w["q_proj"])                  # (B, T, H*Dh)
    k_lin, k_c = linear_forward(source, w["k_proj"])             # (B, S, K*Dh)
    v_lin, v_c = linear_forward(source, w["v_proj"])             # (B, S, K*Dh)
    q, k, v = _split_heads(q_lin, n_heads), _split_heads(k_lin, n_kv), _split_heads(v_lin, n_kv)
    rope_q = rope_k = None
    if rope is not None:
        q, rope_q = rope_forward(q, *rope)                       # (B, H, T, Dh)
        k, rope_k = rope_forward(k, *rope)                       # (B, K, S, Dh)
    o, attn_c = attention_forward(q, k, v, mask, scale, cap)     # (B, H, T, Dh)
    y, o_c = linear_forward(_merge_heads(o), w["o_proj"])        # (B, T, D)
    return y, (q_c, k_c, v_c, rope_q, rope_k, attn_c, o_c)


def attention_block_backward(dy, cache):
    """Returns dx, dsource, {name: dW}. For self-attention the caller adds dsource to dx."""
    q_c, k_c, v_c, rope_q, rope_k, attn_c, o_c = cache
    do_merged, dw_o = linear_backward(dy, o_c)                   # inverts y = o_proj(o)
    qg = attn_c[0]                                               # (B, K, G, T, Dh)
    n_heads = qg.shape[1] * qg.shape[2]
    do = _split_heads(do_merged, n_heads)                        # (B, H, T, Dh)
    dq, dk, dv = attention_backward(do, attn_c)                  # inverts the softmax attention
    if rope_q is not None:
        dq, dk = rope_backward(dq, rope_q), rope_backward(dk, rope_k)   # inverts the rotations
    dx, dw_q = linear_backward(_merge_heads(dq), q_c)            # inverts q = q_proj(x)
    ds_k, dw_k = linear_backward(_merge_heads(dk), k_c)          # inverts k = k_proj(source)
    ds_v, dw_v = linear_backward(_merge_heads(dv), v_c)          # inverts v = v_proj(source)
    return dx, ds_k + ds_v, {"q_proj": dw_q, "k_proj": dw_k, "v_proj": dw_v, "o_proj": dw_o}
