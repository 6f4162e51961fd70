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

from .layers import (linear_backward, linear_forward, rmsnorm_backward, rmsnorm_forward, rope_backward,
                     rope_forward, softcap_backward, softcap_forward)

# ---------------------------------------------------------------------------- masks


def mask_pattern(T, S, causal=False, window=None, rule="le", q_offset=0):
    """(T, S) bool: True where query i (at position q_offset + i) may see key j (at j).
      causal, no window       j <= i
      causal, window w        i - w < j <= i        (w keys including itself)
      bidirectional, no window  every key
      bidirectional, window w   |i - j| <= w (rule "le", T5Gemma in transformers >= 5)
                                or |i - j| < w (rule "lt", transformers 4.53-4.57 and the JAX code)
                                or -((w - 1) // 2) <= j - i <= w // 2 (rule "t5gemma2": w keys,
                                   one more to the right when w is even; transformers'
                                   T5Gemma 2 `sliding_window_mask_function(w, is_causal=False)`)"""
    if rule not in ("le", "lt", "t5gemma2"):
        raise ValueError(f"rule must be 'le', 'lt' or 't5gemma2', got {rule!r}")
    i = np.arange(T)[:, None] + q_offset                         # (T, 1) query positions
    j = np.arange(S)[None, :]                                    # (1, S) key positions
    if causal:
        allowed = j <= i
        return allowed if window is None else allowed & (j > i - window)
    if window is None:
        return np.ones((T, S), dtype=bool)
    if rule == "t5gemma2":
        return (j - i >= -((window - 1) // 2)) & (j - i <= window // 2)
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
    # T5Gemma 2's merged attention: `extra_keys` keys (the encoder's) follow the S - extra_keys
    # self keys. Every query sees each of them, whatever `causal` and `window` say, unless
    # extra_key_mask (B, extra_keys) marks it as padding.
    extra_keys: int = 0
    extra_key_mask: np.ndarray | None = None

    def dense(self, T, S):
        """(B, T, S) bool, or (1, T, S) without a key mask. S counts the extra keys too."""
        n = S - self.extra_keys
        pattern = with_key_padding(mask_pattern(T, n, self.causal, self.window, self.rule, self.q_offset),
                                   self.key_mask)                          # (B or 1, T, n)
        if not self.extra_keys:
            return pattern
        extra = with_key_padding(np.ones((T, self.extra_keys), dtype=bool), self.extra_key_mask)
        B = max(pattern.shape[0], extra.shape[0])
        return np.concatenate([np.broadcast_to(pattern, (B, T, n)),
                               np.broadcast_to(extra, (B, T, self.extra_keys))], axis=-1)   # (B, T, S)


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


class _ReferenceKernels(NamedTuple):
    """The functions the attention block calls when no backend's `Kernels` is given."""
    attention_forward: object
    attention_backward: object
    rmsnorm_forward: object
    rmsnorm_backward: object


_REFERENCE = _ReferenceKernels(attention_forward_masked, attention_backward, rmsnorm_forward, rmsnorm_backward)


class BlockCache(NamedTuple):
    """What attention_block_backward needs, by name."""
    queries: tuple          # (q_proj cache, QK-norm cache or None, RoPE cache or None)
    keys: tuple             # the same for keys and values of `source`: see _keys_forward
    memory: tuple | None    # ... and of `memory` (merged attention), or None
    hidden_memory: tuple | None   # the shape of a memory no query could see (its gradient is 0)
    attn: tuple             # the softmax attention's cache (the reference's: (qg, k, v, p, cap, scale))
    out: tuple              # o_proj's cache
    n_heads: int
    n_self_keys: int        # how many of the attended keys came from `source`
    attend_backward: object
    norm_backward: object


def _heads_forward(x, w_proj, n, w_norm, eps, rope, norm_forward):
    """x (B, L, D) -> heads (B, n, L, Dh): project, split, QK-norm over Dh (Gemma 3, when
    w_norm is given), then RoPE (when rope is given). Returns the heads and the cache."""
    lin, lin_c = linear_forward(x, w_proj)                       # (B, L, n*Dh)
    heads = _split_heads(lin, n)                                 # (B, n, L, Dh)
    norm_c = rope_c = None
    if w_norm is not None:
        heads, norm_c = norm_forward(heads, w_norm, eps)         # RMSNorm over each head's Dh
    if rope is not None:
        heads, rope_c = rope_forward(heads, *rope)               # rotated by position
    return heads, (lin_c, norm_c, rope_c)


def _heads_backward(dheads, cache, norm_backward):
    """Inverts _heads_forward: returns dx, dW_proj, dW_norm (None without QK-norm)."""
    lin_c, norm_c, rope_c = cache
    if rope_c is not None:
        dheads = rope_backward(dheads, rope_c)                   # inverts the rotation
    dw_norm = None
    if norm_c is not None:
        dheads, dw_norm = norm_backward(dheads, norm_c)          # inverts the QK-norm
    dx, dw = linear_backward(_merge_heads(dheads), lin_c)        # inverts the projection
    return dx, dw, dw_norm


def _keys_forward(source, w, n_kv, eps, rope, norm_forward):
    """Keys (k_proj, k_norm, RoPE) and values (v_proj) of one source: (B, K, L, Dh) each."""
    k, k_c = _heads_forward(source, w["k_proj"], n_kv, w.get("k_norm"), eps, rope, norm_forward)
    v, v_c = _heads_forward(source, w["v_proj"], n_kv, None, eps, None, norm_forward)
    return k, v, (k_c, v_c)


def _keys_backward(dk, dv, cache, norm_backward):
    """dsource and the weights' gradients {k_proj, v_proj, k_norm} of _keys_forward."""
    k_c, v_c = cache
    ds_k, dw_k, dw_norm = _heads_backward(dk, k_c, norm_backward)
    ds_v, dw_v, _ = _heads_backward(dv, v_c, norm_backward)
    return ds_k + ds_v, {"k_proj": dw_k, "v_proj": dw_v, "k_norm": dw_norm}   # source fed both


def attention_block_forward(x, source, w, mask, n_heads, n_kv, scale, cap, rope=None, kernels=None,
                            eps=None, memory=None):
    """o_proj(attention(queries of x, keys and values of source [and of memory])).

    Self-attention passes source = x and rope = (cos, sin); T5Gemma's cross-attention passes
    the encoder output as source and rope = None (no RoPE). With QK-norm (Gemma 3: w holds
    "q_norm" and "k_norm", of shape (Dh,)) queries and keys are RMS-normed over head_dim
    with `eps` before RoPE. T5Gemma 2's merged attention passes the encoder output as
    `memory`: its keys (k_proj, k_norm, no RoPE) and values (v_proj) are appended after the
    self keys, and one softmax runs over both; the mask describes all of them
    (`Mask.extra_keys`). w holds "q_proj", "k_proj", "v_proj", "o_proj" (and the norms).
    mask: a `Mask` or a (B, T, S) array. kernels: a `backend.Kernels` (None: the reference).
    x (B, T, D), source (B, S, Ds), memory (B, M, D) -> y (B, T, D)."""
    kern = kernels or _REFERENCE
    hidden_memory = None
    if memory is not None and isinstance(mask, Mask) and mask.extra_key_mask is not None \
            and not np.any(mask.extra_key_mask):
        # No query may see any encoder key: this is self-attention, and is run as such, so
        # that the sums see exactly the numbers Gemma 3's do (extra zero terms would change
        # only their order, i.e. the last bit). The encoder output gets a zero gradient.
        hidden_memory, memory = memory, None
        mask = mask._replace(extra_keys=0, extra_key_mask=None)
    q, q_c = _heads_forward(x, w["q_proj"], n_heads, w.get("q_norm"), eps, rope, kern.rmsnorm_forward)  # (B, H, T, Dh)
    k, v, keys_c = _keys_forward(source, w, n_kv, eps, rope, kern.rmsnorm_forward)                     # (B, K, S, Dh)
    n_self, memory_c = k.shape[2], None
    if memory is not None:
        km, vm, memory_c = _keys_forward(memory, w, n_kv, eps, None, kern.rmsnorm_forward)             # (B, K, M, Dh)
        k, v = np.concatenate([k, km], axis=2), np.concatenate([v, vm], axis=2)             # (B, K, S + M, Dh)
    o, attn_c = kern.attention_forward(q, k, v, mask, scale, cap)                           # (B, H, T, Dh)
    y, o_c = linear_forward(_merge_heads(o), w["o_proj"])                                    # (B, T, D)
    return y, BlockCache(q_c, keys_c, memory_c, None if hidden_memory is None else hidden_memory.shape,
                         attn_c, o_c, n_heads, n_self, kern.attention_backward, kern.rmsnorm_backward)


def attention_block_backward(dy, cache):
    """Returns dx, dsource, dmemory (None without memory), {name: dW}. For self-attention
    the caller adds dsource to dx; dmemory flows back into the encoder."""
    norms = cache.norm_backward
    do_merged, dw_o = linear_backward(dy, cache.out)             # inverts y = o_proj(o)
    do = _split_heads(do_merged, cache.n_heads)                  # (B, H, T, Dh)
    dq, dk, dv = cache.attend_backward(do, cache.attn)           # inverts the softmax attention
    n = cache.n_self_keys
    dx, dw_q, dw_qnorm = _heads_backward(dq, cache.queries, norms)
    dsource, dws = _keys_backward(dk[:, :, :n], dv[:, :, :n], cache.keys, norms)
    dmemory = None if cache.hidden_memory is None else np.zeros(cache.hidden_memory, dtype=dy.dtype)
    if cache.memory is not None:                               # the merged keys: same weights, summed
        dmemory, dws_m = _keys_backward(dk[:, :, n:], dv[:, :, n:], cache.memory, norms)
        dws = {name: None if dw is None else dw + dws_m[name] for name, dw in dws.items()}
    dws.update(q_proj=dw_q, o_proj=dw_o, q_norm=dw_qnorm)
    return dx, dsource, dmemory, {name: dw for name, dw in dws.items() if dw is not None}
