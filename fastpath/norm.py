"""RMSNorm forward and backward as one pass over each row, in Numba.

Same signatures and the same cache as `minencdec.model.layers.rmsnorm_forward/backward`:

    y = x / sqrt(mean(x^2) + eps) * (1 + w),   cache = (xhat, rstd, w)
    dw = sum_rows(dy * xhat);  dx = rstd (dxhat - xhat mean(dxhat * xhat)),  dxhat = dy (1 + w)

so either backward accepts either forward's cache. NumPy makes five or six passes over
the (N, D) array with a temporary each; these kernels read x (or dy and xhat) once per
row while it is in L1. Each lane takes one contiguous block of rows rather than every
other row, so the two lanes write apart, sharing at most the page where their blocks meet
(measured on (8192, 256) float32 under load: 0.65-1.6 ms against 1.2-3.2 ms for
alternating rows); the backward's dw is summed per lane, then across lanes.

Rows in memory order. Gemma 3's QK-norm normalises the heads (B, H, T, Dh) that
attention._split_heads makes: a transposed view of a (B, T, H, Dh) array, whose rows are
contiguous but not in (B, H, T) order. `_as_rows` reads such an array as the (N, D) rows
it holds, in memory order and without a copy, and the outputs are laid out the same way
(so merging the heads back, after the backward, is a reshape rather than a copy).
Measured in `fastpath.bench` (section "rmsnorm", which includes that QK-norm shape).

Axes: N rows (every leading axis), D width.
"""

from __future__ import annotations

import numpy as np
from minencdec.model import layers as reference

from .jit import kernel, lanes, run_lanes

# Elements (N D) from which the rows are split over threads: a judgement on this shared
# 2-core machine. Under load (2.8) one lane took 49 / 113 / 176 us on 256 / 1024 / 2048 rows
# of 256 float32 and two lanes 90 / 144 / 222 us (the hand-off to a busy core is most of it);
# the training step's norms, 2^20 elements and more, are split.
PARALLEL_WORK = 1 << 18


def _lanes(N, D):
    return lanes(N) if N * D >= PARALLEL_WORK else 1


@kernel
def _forward_lane(lane, n_lanes, x, w, eps, one, y, xhat, rstd):
    """Rows [lane N / n_lanes, (lane + 1) N / n_lanes) of y, xhat and rstd."""
    N, D = x.shape
    inv_d = one / D                                           # scalars stay in x's dtype:
    for i in range(lane * N // n_lanes, (lane + 1) * N // n_lanes):   # a bare 1 or 1/D would be float64
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
    """Rows [lane N / n_lanes, (lane + 1) N / n_lanes) of dx, and this lane's share of dw in dw_part[lane]."""
    N, D = dy.shape
    inv_d = one / D
    for i in range(lane * N // n_lanes, (lane + 1) * N // n_lanes):
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


def _memory_order(x):
    """The axes of x (..., D) from the largest stride to the smallest, D last, when that order
    makes x C-contiguous (no copy needed); None when it does not."""
    order = sorted(range(x.ndim - 1), key=lambda a: -x.strides[a]) + [x.ndim - 1]
    return order if x.transpose(order).flags.c_contiguous else None


def _as_rows(x, order):
    """x (..., D) as (N, D) C-contiguous rows taken in the axis order `order`: a view when x
    is laid out that way, else a copy."""
    return np.ascontiguousarray(x.transpose(order)).reshape(-1, x.shape[-1])


def _from_rows(rows, shape, order):
    """Inverts _as_rows: the (N, D) rows as an array of `shape` (a view, strided like the x
    they came from)."""
    return rows.reshape([shape[a] for a in order]).transpose(np.argsort(order))


def rmsnorm_forward(x, w, eps):
    """y = x / sqrt(mean(x^2) + eps) * (1 + w). x (..., D), w (D,). Cache as the reference's.
    y and the cache's xhat are laid out as x is (module notes)."""
    x, w = np.asarray(x), np.asarray(w)
    if not _covered(x, w) or w.shape != x.shape[-1:] or x.size == 0:
        return reference.rmsnorm_forward(x, w, eps)
    order = _memory_order(x) or list(range(x.ndim))
    x2 = _as_rows(x, order)                                   # (N, D)
    N, dt = x2.shape[0], x.dtype.type
    y, xhat, rstd = np.empty_like(x2), np.empty_like(x2), np.empty((N, 1), x.dtype)
    run_lanes(_forward_lane, _lanes(N, x2.shape[1]), x2, np.ascontiguousarray(w), dt(eps), dt(1), y, xhat, rstd[:, 0])
    rstd_shape = x.shape[:-1] + (1,)
    return _from_rows(y, x.shape, order), (_from_rows(xhat, x.shape, order), _from_rows(rstd, rstd_shape, order), w)


def rmsnorm_backward(dy, cache):
    """dx (..., D), dw (D,), from the cache of either rmsnorm_forward. dx is laid out as xhat."""
    xhat, rstd, w = cache
    dy = np.asarray(dy)
    if not _covered(dy, xhat, rstd, w) or dy.shape != xhat.shape or dy.size == 0:
        return reference.rmsnorm_backward(dy, cache)
    D = dy.shape[-1]
    order = _memory_order(xhat) or list(range(dy.ndim))       # xhat's rows as they lie; dy follows
    xhat2, dy2 = _as_rows(xhat, order), _as_rows(dy, order)
    rstd2 = _as_rows(np.broadcast_to(rstd, dy.shape[:-1] + (1,)), order)[:, 0]
    N = dy2.shape[0]
    n_lanes = _lanes(N, D)
    dx, dw_part = np.empty_like(dy2), np.zeros((n_lanes, D), dy.dtype)
    run_lanes(_backward_lane, n_lanes, dy2, xhat2, np.ascontiguousarray(rstd2), np.ascontiguousarray(w),
              dy.dtype.type(1), dx, dw_part)
    return _from_rows(dx, dy.shape, order), dw_part.sum(axis=0)
