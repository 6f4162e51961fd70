"""Attention: the masks, softmax attention with GQA and softcapping, and the attention block.

A mask is a boolean array, True where query i may see key j, of shape (B, T, S) (or one
that broadcasts to it). The models pass a `Mask` description instead (causal or not, the
window, the padding), which `Mask.dense` turns into that array; the fast path reads the
description itself. Masked scores become -inf and the softmax is safe on a row with
no visible key: that query's output and gradients are exactly zero.

Axes: B batch, T query length, S key length, D model width, H query heads, K kv heads,
G = H / K queries per kv head, Dh head dim.

The batched products are einsums, whose index strings name the axes. They are also faster
here than batched matmul, which makes one small BLAS call per (batch, head): with a
multi-threaded BLAS on a busy machine each call can stall for milliseconds (measured on a
shared 2-core machine: 0.9 s for a (16, 4) batch of 128x32 @ 32x128, 7 ms as an einsum).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import linear_backward, linear_forward, rope_backward, rope_forward, \
    softcap_backward, softcap_forward

# ---------------------------------------------------------------------------- masks


def mask_pattern(T, S, causal=False, window=None, rule="le", q_offset=0):
    """(T, S) bool: True where query i (at position q_offset + i) may see key j (at j).
      causal, no window       j <= i
      causal, window w        i - w < j <= i        (w keys including itself)
      bidirectional, no window  every key
      bidirectional, window w   |i - j| <= w (rule "le", transformers >= 5)
                                or |i - j| < w (rule "lt", transformers 4.53-4.57 and the JAX code)"""
    if rule not in ("le", "lt"):
        raise ValueError(f"rule must be 'le' or 'lt', got {rule!r}")
    i = np.arange(T)[:, None] + q_offset                         # (T, 1) query positions
    j = np.arange(S)[None, :]                                    # (1, S) key positions
    if causal:
        allowed = j <= i
        return allowed if window is None else allowed & (j > i - window)
    if window is None:
        return np.ones((T, S), dtype=bool)
    distance = np.abs(i - j)
    return distance <= window if rule == "le" else distance < window


def causal_mask(T, window=None, offset=0):
    """(T, offset + T): query i (at position offset + i) sees key j iff j <= i and, with a
    window w, i - w < j (w keys including itself)."""
    return mask_pattern(T, offset + T, causal=True, window=window, q_offset=offset)


def bidirectional_mask(T, window=None, rule="le"):
    """(T, T): every key visible; with a window, |i - j| <= w (rule "le") or < w ("lt")."""
    return mask_pattern(T, T, causal=False, window=window, rule=rule)


def with_key_padding(mask, key_mask):
    """Combine a (T, S) pattern with key padding (B, S) (1 = real token) -> (B, T, S)."""
    if key_mask is None:
        return mask[None]
    return mask[None] & (np.asarray(key_mask) != 0)[:, None, :]


class Mask(NamedTuple):
    """A mask as a description rather than an array: what the model passes to attention.
    The reference turns it into the (B, T, S) array with `dense`; the fast path
    (fastpath/attention.py) reads the description and never builds the array."""

    causal: bool
    window: int | None = None              # sliding window, None = every key in range
    rule: str = "le"                       # the bidirectional window rule (mask_pattern)
    key_mask: np.ndarray | None = None     # (B, S), 1 = a real key, 0 = padding
    q_offset: int = 0                      # position of query 0 (a KV cache's later steps)

    def dense(self, T, S):
        """(B, T, S) bool, or (1, T, S) without a key mask."""
        pattern = mask_pattern(T, S, self.causal, self.window, self.rule, self.q_offset)
        return with_key_padding(pattern, self.key_mask)


# ---------------------------------------------------------------------------- softmax attention


def cross_mask(attention_mask):
    """Cross-attention: every real encoder key, never windowed; padded ones hidden."""
    return Mask(causal=False, key_mask=attention_mask)


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


def attention_forward_masked(q, k, v, mask, scale, cap):
    """attention_forward for a mask given as a `Mask` description or as an array."""
    if isinstance(mask, Mask):
        mask = mask.dense(q.shape[2], k.shape[2])                # (B, T, S)
    return attention_forward(q, k, v, mask, scale, cap)


# ---------------------------------------------------------------------------- the attention block


def _split_heads(x, n):
    B, T, _ = x.shape
    return x.reshape(B, T, n, -1).transpose(0, 2, 1, 3)          # (B, T, n*Dh) -> (B, n, T, Dh)


def _merge_heads(x):
    B, n, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, n * Dh)         # (B, n, T, Dh) -> (B, T, n*Dh)


def attention_block_forward(x, source, w, mask, n_heads, n_kv, scale, cap, rope=None, kernels=None):
    """o_proj(attention(q_proj(x), k_proj(source), v_proj(source))).

    Self-attention passes source = x and rope = (cos, sin); cross-attention passes the
    encoder output as source and rope = None (no RoPE). w holds "q_proj", "k_proj",
    "v_proj", "o_proj" weights. mask: a `Mask` or a (B, T, S) array. kernels: a
    `backend.Kernels` (None: the reference). x (B, T, D), source (B, S, Ds) -> y (B, T, D)."""
    attend = attention_forward_masked if kernels is None else kernels.attention_forward
    attend_backward = attention_backward if kernels is None else kernels.attention_backward
    q_lin, q_c = linear_forward(x, w["q_proj"])                  # (B, T, H*Dh)
    k_lin, k_c = linear_forward(source, w["k_proj"])             # (B, S, K*Dh)
    v_lin, v_c = linear_forward(source, w["v_proj"])             # (B, S, K*Dh)
    q, k, v = _split_heads(q_lin, n_heads), _split_heads(k_lin, n_kv), _split_heads(v_lin, n_kv)
    rope_q = rope_k = None
    if rope is not None:
        q, rope_q = rope_forward(q, *rope)                       # (B, H, T, Dh)
        k, rope_k = rope_forward(k, *rope)                       # (B, K, S, Dh)
    o, attn_c = attend(q, k, v, mask, scale, cap)                # (B, H, T, Dh)
    y, o_c = linear_forward(_merge_heads(o), w["o_proj"])        # (B, T, D)
    return y, (q_c, k_c, v_c, rope_q, rope_k, attn_c, o_c, n_heads, attend_backward)


def attention_block_backward(dy, cache):
    """Returns dx, dsource, {name: dW}. For self-attention the caller adds dsource to dx."""
    q_c, k_c, v_c, rope_q, rope_k, attn_c, o_c, n_heads, attend_backward = cache
    do_merged, dw_o = linear_backward(dy, o_c)                   # inverts y = o_proj(o)
    do = _split_heads(do_merged, n_heads)                        # (B, H, T, Dh)
    dq, dk, dv = attend_backward(do, attn_c)                     # inverts the softmax attention
    if rope_q is not None:
        dq, dk = rope_backward(dq, rope_q), rope_backward(dk, rope_k)   # inverts the rotations
    dx, dw_q = linear_backward(_merge_heads(dq), q_c)            # inverts q = q_proj(x)
    ds_k, dw_k = linear_backward(_merge_heads(dk), k_c)          # inverts k = k_proj(source)
    ds_v, dw_v = linear_backward(_merge_heads(dv), v_c)          # inverts v = v_proj(source)
    return dx, ds_k + ds_v, {"q_proj": dw_q, "k_proj": dw_k, "v_proj": dw_v, "o_proj": dw_o}
