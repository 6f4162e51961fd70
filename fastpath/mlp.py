"""The GeGLU MLP with its elementwise middle fused into one Numba pass, forward and backward.

Same signatures as `minencdec.model.layers.mlp_forward/backward`:

    g = x Wg^T,  u = x Wu^T                              (N, F)  BLAS
    h = gelu_tanh(g) * u                                 (N, F)  one pass here
    y = h Wd^T                                           (N, D)  BLAS

The reference makes about ten NumPy passes over (N, F) arrays for the middle line (x^3,
the tanh argument, tanh, 1 + t, the products), each with a fresh temporary, and keeps
gelu's input, its tanh and the activation for the backward. Here one pass reads g and u
and writes h; the backward reads dh, g and u once, recomputes tanh, and writes dg and du:

    t  = tanh(c (g + 0.044715 g^3)),  a = g (1 + t) / 2,   c = sqrt(2 / pi)
    du = dh a
    dg = dh u (0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 0.044715 g^2))

The three matrix products stay single BLAS calls: fusing the epilogue into the product
would mean writing our own GEMM, and OpenBLAS's reaches the machine's peak already
(`python -m fastpath.bench`, section blas). Measured in the "mlp" section of the bench.

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
def _geglu_forward_lane(lane, n_lanes, g, u, c, k, half, one, h):
    N, F = g.shape
    for i in range(lane, N, n_lanes):
        for j in range(F):
            x = g[i, j]
            t = tanh(c * (x + k * x * x * x))
            h[i, j] = half * x * (one + t) * u[i, j]


@kernel
def _geglu_backward_lane(lane, n_lanes, dh, g, u, c, k, half, one, three, dg, du):
    N, F = g.shape
    for i in range(lane, N, n_lanes):
        for j in range(F):
            x = g[i, j]
            t = tanh(c * (x + k * x * x * x))
            d = dh[i, j]
            du[i, j] = d * half * x * (one + t)
            dg[i, j] = d * u[i, j] * (half * (one + t) + half * x * (one - t * t) * c * (one + three * k * x * x))


def _consts(dt):
    return dt(_C), dt(_K), dt(0.5), dt(1)


def geglu_forward(g, u):
    """h = gelu_tanh(g) * u for g, u (N, F) C-contiguous, one float dtype."""
    h = np.empty_like(g)
    run_lanes(_geglu_forward_lane, lanes(g.shape[0]), g, u, *_consts(g.dtype.type), h)
    return h


def geglu_backward(dh, g, u):
    """dg, du (N, F) from dh (N, F) and the forward's g, u."""
    dg, du = np.empty_like(g), np.empty_like(g)
    dt = g.dtype.type
    run_lanes(_geglu_backward_lane, lanes(g.shape[0]), np.ascontiguousarray(dh, g.dtype), g, u,
              *_consts(dt), dt(3), dg, du)
    return dg, du


def _covered(x, *ws):
    return x.dtype in (np.float32, np.float64) and all(w.dtype == x.dtype for w in ws) and x.size > 0


def mlp_forward(x, w_gate, w_up, w_down):
    """down(gelu_tanh(gate(x)) * up(x)). x (..., D); w_gate, w_up (F, D); w_down (D, F)."""
    x = np.asarray(x)
    if not _covered(x, w_gate, w_up, w_down):
        return reference.mlp_forward(x, w_gate, w_up, w_down)
    lead, D = x.shape[:-1], x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)                   # (N, D)
    g = x2 @ w_gate.T                                             # (N, F)
    u = x2 @ w_up.T                                               # (N, F)
    h = geglu_forward(g, u)                                       # (N, F)
    y = h @ w_down.T                                              # (N, D)
    return y.reshape(*lead, -1), ("fast", x2, g, u, h, w_gate, w_up, w_down)


def mlp_backward(dy, cache):
    """dx, dw_gate, dw_up, dw_down, as the reference's mlp_backward."""
    if cache[0] != "fast":
        return reference.mlp_backward(dy, cache)
    _, x2, g, u, h, w_gate, w_up, w_down = cache
    dy2 = np.ascontiguousarray(dy, x2.dtype).reshape(-1, w_down.shape[0])   # (N, D)
    dw_down = dy2.T @ h                                           # inverts y = h Wd^T
    dh = dy2 @ w_down                                             # (N, F)
    dg, du = geglu_backward(dh, g, u)                             # inverts h = gelu(g) u
    dw_up, dw_gate = du.T @ x2, dg.T @ x2                         # inverts u, g = x W^T
    dx = dg @ w_gate + du @ w_up                                  # x fans out to gate and up
    return dx.reshape(*dy.shape[:-1], -1), dw_gate, dw_up, dw_down
