"""RMSNorm forward and backward as one pass over each row, in Numba.

Same signatures and the same cache as `minencdec.model.layers.rmsnorm_forward/backward`:

    y = x / sqrt(mean(x^2) + eps) * (1 + w),   cache = (xhat, rstd, w)
    dw = sum_rows(dy * xhat);  dx = rstd (dxhat - xhat mean(dxhat * xhat)),  dxhat = dy (1 + w)

so either backward accepts either forward's cache. NumPy makes five or six passes over
the (N, D) array with a temporary each; these kernels read x (or dy and xhat) once per
row while it is in L1. The backward's dw is summed per lane, then across lanes.
Whether that is worth it is measured in `fastpath.bench` (section "rmsnorm").

Axes: N rows (every leading axis), D width.
"""

from __future__ import annotations

import numpy as np
from minencdec.model import layers as reference

from .jit import kernel, lanes, run_lanes


@kernel
def _forward_lane(lane, n_lanes, x, w, eps, one, y, xhat, rstd):
    """Rows lane, lane + n_lanes, ... of y, xhat and rstd."""
    N, D = x.shape
    inv_d = one / D                                           # scalars stay in x's dtype:
    for i in range(lane, N, n_lanes):                         # a bare 1 or 1/D would be float64
        ss = one - one
        for d in range(D):
            ss += x[i, d] * x[i, d]
        r = one / np.sqrt(ss * inv_d + eps)
        rstd[i] = r
        for d in range(D):
            xh = x[i, d] * r
            xhat[i, d] = xh
            y[i, d] = xh * (one + w[d])


@kernel
def _backward_lane(lane, n_lanes, dy, xhat, rstd, w, one, dx, dw_part):
    """Rows lane, lane + n_lanes, ... of dx, and this lane's share of dw in dw_part[lane]."""
    N, D = dy.shape
    inv_d = one / D
    for i in range(lane, N, n_lanes):
        dot = one - one
        for d in range(D):
            dw_part[lane, d] += dy[i, d] * xhat[i, d]         # dw: inverts y = xhat (1 + w)
            dot += dy[i, d] * (one + w[d]) * xhat[i, d]
        mean = dot * inv_d
        for d in range(D):                                    # inverts xhat = x rstd (radial part out)
            dx[i, d] = rstd[i] * (dy[i, d] * (one + w[d]) - xhat[i, d] * mean)


def _covered(*arrays):
    dt = arrays[0].dtype
    return dt in (np.float32, np.float64) and all(a.dtype == dt for a in arrays)


def rmsnorm_forward(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * (1 + w). x (..., D), w (D,). Cache as the reference's."""
    x, w = np.asarray(x), np.asarray(w)
    if not _covered(x, w) or w.shape != x.shape[-1:] or x.size == 0:
        return reference.rmsnorm_forward(x, w, eps)
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)               # (N, D)
    N, dt = x2.shape[0], x.dtype.type
    y, xhat, rstd = np.empty_like(x2), np.empty_like(x2), np.empty(N, x.dtype)
    run_lanes(_forward_lane, lanes(N), x2, np.ascontiguousarray(w), dt(eps), dt(1), y, xhat, rstd)
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)), w)


def rmsnorm_backward(dy, cache):
    """dx (..., D), dw (D,), from the cache of either rmsnorm_forward."""
    xhat, rstd, w = cache
    dy = np.asarray(dy)
    if not _covered(dy, xhat, rstd, w) or dy.shape != xhat.shape or dy.size == 0:
        return reference.rmsnorm_backward(dy, cache)
    D = dy.shape[-1]
    dy2 = np.ascontiguousarray(dy).reshape(-1, D)
    N = dy2.shape[0]
    n_lanes = lanes(N)
    dx, dw_part = np.empty_like(dy2), np.zeros((n_lanes, D), dy.dtype)
    run_lanes(_backward_lane, n_lanes, dy2, np.ascontiguousarray(xhat).reshape(-1, D), np.ascontiguousarray(rstd).reshape(-1),
              np.ascontiguousarray(w), dy.dtype.type(1), dx, dw_part)
    return dx.reshape(dy.shape), dw_part.sum(axis=0)
