"""Gemma 2's small blocks, each a forward function and its backward right beside it.

Every `*_forward` returns `(output, cache)`; the matching `*_backward(d_output, cache)`
returns the gradients of the forward's inputs, in the forward's argument order. No state
lives on objects. Arrays are float32 or float64; the caller picks.

Axes: B batch, T sequence, D model width, F ffn width, V vocab, H heads, Dh head dim.
Linear weights are stored as Hugging Face stores them: (out_features, in_features).
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------- linear


def linear_forward(x, w):
    """y = x W^T. x (..., In), w (Out, In) -> y (..., Out).

    The leading axes are flattened into one: NumPy runs a 3-D `x @ w.T` as a loop of
    small products, about 7x slower than one 2-D BLAS call on the same numbers."""
    y = x.reshape(-1, x.shape[-1]) @ w.T                         # (N, Out)
    return y.reshape(*x.shape[:-1], w.shape[0]), (x, w)


def linear_backward(dy, cache):
    x, w = cache
    dx = (dy.reshape(-1, dy.shape[-1]) @ w).reshape(x.shape)     # (..., In)    inverts y = x W^T for x
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])   # (Out, In) sums over every row
    return dx, dw


# ---------------------------------------------------------------------------- embedding


def embedding_forward(ids, table, padding_idx=None):
    """h = E[ids] * sqrt(D). ids (B, T) int, table (V, D) -> h (B, T, D).

    The scale is cast to the table's dtype before the multiply, as transformers does (in
    float32 sqrt(2304) = 48.0 exactly, but sqrt(3584) rounds). `padding_idx`: that row gets
    no gradient from its uses here, as in torch's nn.Embedding(padding_idx=pad), which
    Gemma 2 and T5Gemma use (the tied LM head still trains it)."""
    scale = np.asarray(np.sqrt(table.shape[1]), dtype=table.dtype)
    return table[ids] * scale, (ids, scale, table.shape, padding_idx)


def embedding_backward(dh, cache):
    ids, scale, shape, padding_idx = cache
    dtable = np.zeros(shape, dtype=dh.dtype)                     # (V, D)
    np.add.at(dtable, ids.reshape(-1), (dh * scale).reshape(-1, shape[1]))  # a row per token, repeats add up
    if padding_idx is not None:
        dtable[padding_idx] = 0.0                                # pad tokens do not train their row
    return dtable


def embedding_backward_into(dtable, dh, cache):
    """embedding_backward added into an existing (V, D) gradient in place: for a table that
    other uses (the tied LM head, the other stack) already have a gradient for, so no
    second (V, D) array is made (0.67 GB for a 262,144 x 640 table)."""
    ids, scale, shape, padding_idx = cache
    ids, rows = ids.reshape(-1), (dh * scale).reshape(-1, shape[1])
    if padding_idx is not None:
        keep = ids != padding_idx                                # pad tokens do not train their row
        ids, rows = ids[keep], rows[keep]
    np.add.at(dtable, ids, rows)


# ---------------------------------------------------------------------------- RMSNorm


def rmsnorm_forward(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * (1 + w). x (..., D), w (D,) stored as an offset from 1.

    Computed in x's dtype, which is float32 or float64: never below float32 (transformers
    upcasts to float32; a float64 model stays float64 here)."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # (..., 1)
    xhat = x * rstd                                                          # (..., D)
    return xhat * (1.0 + w), (xhat, rstd, w)


def rmsnorm_backward(dy, cache):
    xhat, rstd, w = cache
    dw = np.sum(dy * xhat, axis=tuple(range(dy.ndim - 1)))       # (D,)   inverts y = xhat * (1 + w) for w
    dxhat = dy * (1.0 + w)                                        # (..., D) ... and for xhat
    # xhat = x * rstd with rstd depending on x: project out the radial part.
    dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dw


# ---------------------------------------------------------------------------- softcap


def softcap_forward(x, cap):
    """cap * tanh(x / cap); the identity when cap is None."""
    if cap is None:
        return x, None
    t = np.tanh(x / cap)
    return cap * t, t


def softcap_backward(dy, cache):
    t = cache
    return dy if t is None else dy * (1.0 - t * t)               # d/dx cap tanh(x/cap) = 1 - tanh^2


# ---------------------------------------------------------------------------- GeGLU MLP

_GELU_C = math.sqrt(2.0 / math.pi)     # a Python float: a numpy float64 scalar would promote float32 arrays


def gelu_tanh_forward(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the "gelu_pytorch_tanh" of Gemma."""
    t = np.tanh(_GELU_C * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(dy, cache):
    x, t = cache
    dinner = _GELU_C * (1.0 + 3 * 0.044715 * x * x)              # d(inner)/dx
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner)


def mlp_forward(x, w_gate, w_up, w_down):
    """down(gelu_tanh(gate(x)) * up(x)). x (B, T, D); w_gate, w_up (F, D); w_down (D, F)."""
    g, gate_c = linear_forward(x, w_gate)                        # (B, T, F)
    u, up_c = linear_forward(x, w_up)                            # (B, T, F)
    a, act_c = gelu_tanh_forward(g)                              # (B, T, F)
    y, down_c = linear_forward(a * u, w_down)                    # (B, T, D)
    return y, (gate_c, up_c, act_c, down_c, a, u)


def mlp_backward(dy, cache):
    gate_c, up_c, act_c, down_c, a, u = cache
    dh, dw_down = linear_backward(dy, down_c)                    # inverts y = down(h), h = a * u
    da, du = dh * u, dh * a                                      # inverts h = a * u
    dg = gelu_tanh_backward(da, act_c)                           # inverts a = gelu(g)
    dx_up, dw_up = linear_backward(du, up_c)                     # inverts u = up(x)
    dx_gate, dw_gate = linear_backward(dg, gate_c)               # inverts g = gate(x)
    return dx_gate + dx_up, dw_gate, dw_up, dw_down              # x fans out to gate and up


# ---------------------------------------------------------------------------- RoPE


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos, sin of shape (..., T, Dh) for integer positions (..., T).

    The half-split convention: dims i and i + Dh/2 form a pair rotating at frequency
    theta^(-2i/Dh), so the table is [freqs, freqs]. Computed in float64, then cast."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (Dh/2,)
    freqs = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq               # (..., T, Dh/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                                       # (..., T, Dh)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def _rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the last axis: a 90-degree turn of every (i, i + Dh/2) pair."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transposed(x):
    """The transpose (= inverse) of _rotate_half: [z1, z2] -> [z2, -z1]."""
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], -x[..., :half]], axis=-1)


def rope_forward(x, cos, sin):
    """Rotate x (B, heads, T, Dh) by position; cos, sin (B or 1, 1, T, Dh) broadcast."""
    return x * cos + _rotate_half(x) * sin, (cos, sin)


def rope_backward(dy, cache):
    cos, sin = cache
    return dy * cos + _rotate_half_transposed(dy * sin)         # a rotation's gradient is its transpose
