"""The GeGLU MLP with its elementwise middle fused into one Numba pass, forward and backward.

Same signatures as `minencdec.model.layers.mlp_forward/backward`:

    [g u] = x [Wg; Wu]^T                                 (N, 2F) one BLAS call
    h = gelu_tanh(g) * u                                 (N, F)  one pass here
    y = h Wd^T                                           (N, D)  BLAS

The reference makes about ten NumPy passes over (N, F) arrays for the middle line (x^3,
the tanh argument, tanh, 1 + t, the products), each with a fresh temporary, and keeps
gelu's input, its tanh and the activation for the backward. Here one pass reads g and u
and writes h; the backward reads dh, g and u once, recomputes tanh, and writes dg and du:

    t  = tanh(c (g + 0.044715 g^3)),  a = g (1 + t) / 2,   c = sqrt(2 / pi)
    du = dh a
    dg = dh u (0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 0.044715 g^2))

The gate and up projections are one product against the two weights stacked (copied per
call: F D numbers, far less than the product's work), so the backward's dx is one product
too, [dg du] [Wg; Wu], with no sum of two (N, D) arrays, and [dWg; dWu] = [dg du]^T x one
more. The products stay BLAS calls: fusing the epilogue into the product would mean
writing our own GEMM, and OpenBLAS's reaches the machine's peak already (`python -m
fastpath.bench`, section blas).

Axes: N rows (every leading axis), D width, F hidden width.
"""

from __future__ import annotations

import math

import numpy as np
from minencdec.model import layers as reference

from .jit import kernel, lanes, run_lanes
from .mathfn import tanh

_C = math.sqrt(2.0 / math.pi)
_K = 0.044715


@kernel
def _geglu_forward_lane(lane, n_lanes, gu, c, k, half, one, h):
    """h = gelu_tanh(g) u for the rows of this lane; gu (N, 2F) holds [g u]."""
    N, F = h.shape
    for i in range(lane, N, n_lanes):
        g, u, hr = gu[i, :F], gu[i, F:], h[i]                # row slices: loops from 0 (dense.py)
        for j in range(F):
            x = g[j]
            t = tanh(c * (x + k * x * x * x))
            hr[j] = half * x * (one + t) * u[j]


@kernel
def _geglu_backward_lane(lane, n_lanes, dh, gu, c, k, half, one, three, dgu):
    """[dg du] (N, 2F) from dh (N, F) and the forward's [g u]."""
    N, F = dh.shape
    for i in range(lane, N, n_lanes):
        g, u, dg, du, dr = gu[i, :F], gu[i, F:], dgu[i, :F], dgu[i, F:], dh[i]
        for j in range(F):
            x = g[j]
            t = tanh(c * (x + k * x * x * x))
            d = dr[j]
            du[j] = d * half * x * (one + t)
            dg[j] = d * u[j] * (half * (one + t) + half * x * (one - t * t) * c * (one + three * k * x * x))


def _consts(dt):
    return dt(_C), dt(_K), dt(0.5), dt(1)


def geglu_forward(gu):
    """h = gelu_tanh(g) * u (N, F) for gu = [g u] (N, 2F) C-contiguous, one float dtype."""
    N, F2 = gu.shape
    h = np.empty((N, F2 // 2), gu.dtype)
    run_lanes(_geglu_forward_lane, lanes(N), gu, *_consts(gu.dtype.type), h)
    return h


def geglu_backward(dh, gu):
    """[dg du] (N, 2F) from dh (N, F) and the forward's gu = [g u]."""
    dgu = np.empty_like(gu)
    dt = gu.dtype.type
    run_lanes(_geglu_backward_lane, lanes(gu.shape[0]), np.ascontiguousarray(dh, gu.dtype), gu,
              *_consts(dt), dt(3), dgu)
    return dgu


def _covered(x, *ws):
    return x.dtype in (np.float32, np.float64) and all(w.dtype == x.dtype for w in ws) and x.size > 0


def mlp_forward(x, w_gate, w_up, w_down):
    """down(gelu_tanh(gate(x)) * up(x)). x (..., D); w_gate, w_up (F, D); w_down (D, F)."""
    x = np.asarray(x)
    if not _covered(x, w_gate, w_up, w_down):
        return reference.mlp_forward(x, w_gate, w_up, w_down)
    lead, D = x.shape[:-1], x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)                   # (N, D)
    w_gu = np.concatenate([w_gate, w_up])                         # (2F, D)
    gu = x2 @ w_gu.T                                              # (N, 2F) = [g u]
    h = geglu_forward(gu)                                         # (N, F)
    y = h @ w_down.T                                              # (N, D)
    return y.reshape(*lead, -1), ("fast", x2, gu, w_gate, w_up, w_down)   # h: recomputed by the backward


def mlp_backward(dy, cache):
    """dx, dw_gate, dw_up, dw_down, as the reference's mlp_backward. h = gelu(g) u is made
    again from [g u] (one pass) rather than kept: an (N, F) array per layer less to hold
    between the forward and the backward (226 MB for the 270M-270M step)."""
    if cache[0] != "fast":
        return reference.mlp_backward(dy, cache)
    _, x2, gu, w_gate, w_up, w_down = cache
    F = w_gate.shape[0]
    dy2 = np.ascontiguousarray(dy, x2.dtype).reshape(-1, w_down.shape[0])   # (N, D)
    dw_down = dy2.T @ geglu_forward(gu)                           # inverts y = h Wd^T
    dh = dy2 @ w_down                                             # (N, F)
    dgu = geglu_backward(dh, gu)                                  # inverts h = gelu(g) u: [dg du]
    dw_gu = dgu.T @ x2                                            # inverts [g u] = x [Wg; Wu]^T for W ...
    dx = dgu @ np.concatenate([w_gate, w_up])                     # ... and for x (it fed both)
    return dx.reshape(*dy.shape[:-1], -1), dw_gu[:F], dw_gu[F:], dw_down
