"""Small matrix products on tiles, the inner loops of the attention kernels, and the tiled
layouts they read.

    mm_nn(A, B, C, M, Kd, N):  C[:M, :N] += A[:M, :Kd] @ B[:Kd, :N]
    mm_tn(A, B, C, M, Kd, N):  C[:M, :N] += A[:Kd, :M].T @ B[:Kd, :N]

M and Kd must be multiples of 4 (callers pad their tiles with zeros); N is free. The
loop keeps a 4 x 4 block of A in scalars and streams 4 rows of B into 4 rows of C, so
each vector of B loaded feeds 4 multiply-adds; the innermost loop over N is what LLVM
vectorises. Measured on this machine (one core, under load) on 64 x 64 x 64 tiles: 36-44
GFLOP/s float32 (55-64 with N = 128) and 20-30 float64, against 7-20 for a triple loop
with the dot product innermost and 5-9 for scalar 4 x 4 register blocks (LLVM does not
vectorise those). A reads as scalars, so reading it transposed (mm_tn) costs about the
same: no tile is ever transposed.
Both need contiguous 2-D arrays (tile views of the tiled layouts below are).
"""

from __future__ import annotations

import numpy as np

from .jit import kernel


@kernel
def mm_nn(A, B, C, M, Kd, N):
    for i in range(0, M, 4):
        c0, c1, c2, c3 = C[i], C[i + 1], C[i + 2], C[i + 3]
        for k in range(0, Kd, 4):
            b0, b1, b2, b3 = B[k], B[k + 1], B[k + 2], B[k + 3]
            a00, a01, a02, a03 = A[i, k], A[i, k + 1], A[i, k + 2], A[i, k + 3]
            a10, a11, a12, a13 = A[i + 1, k], A[i + 1, k + 1], A[i + 1, k + 2], A[i + 1, k + 3]
            a20, a21, a22, a23 = A[i + 2, k], A[i + 2, k + 1], A[i + 2, k + 2], A[i + 2, k + 3]
            a30, a31, a32, a33 = A[i + 3, k], A[i + 3, k + 1], A[i + 3, k + 2], A[i + 3, k + 3]
            for n in range(N):
                x0, x1, x2, x3 = b0[n], b1[n], b2[n], b3[n]
                c0[n] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                c1[n] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                c2[n] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                c3[n] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3


@kernel
def mm_tn(A, B, C, M, Kd, N):
    for i in range(0, M, 4):
        c0, c1, c2, c3 = C[i], C[i + 1], C[i + 2], C[i + 3]
        for k in range(0, Kd, 4):
            b0, b1, b2, b3 = B[k], B[k + 1], B[k + 2], B[k + 3]
            a00, a01, a02, a03 = A[k, i], A[k + 1, i], A[k + 2, i], A[k + 3, i]
            a10, a11, a12, a13 = A[k, i + 1], A[k + 1, i + 1], A[k + 2, i + 1], A[k + 3, i + 1]
            a20, a21, a22, a23 = A[k, i + 2], A[k + 1, i + 2], A[k + 2, i + 2], A[k + 3, i + 2]
            a30, a31, a32, a33 = A[k, i + 3], A[k + 1, i + 3], A[k + 2, i + 3], A[k + 3, i + 3]
            for n in range(N):
                x0, x1, x2, x3 = b0[n], b1[n], b2[n], b3[n]
                c0[n] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
                c1[n] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
                c2[n] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
                c3[n] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3

# ---------------------------------------------------------------------------- tiled layouts


def _round4(n):
    return (n + 3) // 4 * 4


def tile_rows(x, n_tiles, tile, Dp):
    """(B, N, L, Dh) -> (B, N, n_tiles, tile, Dp), zero-padded past L and Dh."""
    B, N, L, Dh = x.shape
    out = np.zeros((B, N, n_tiles * tile, Dp), x.dtype)
    out[:, :, :L, :Dh] = x
    return out.reshape(B, N, n_tiles, tile, Dp)


def _transpose_tiles(x):
    """(B, N, n_tiles, a, b) -> (B, N, n_tiles, b, a), contiguous."""
    return np.ascontiguousarray(x.swapaxes(-1, -2))


def _untile(x, L, Dh):
    """(B, N, n_tiles, tile, Dp) -> (B, N, L, Dh)."""
    B, N, n, tile, Dp = x.shape
    return np.ascontiguousarray(x.reshape(B, N, n * tile, Dp)[:, :, :L, :Dh])


def tile_keys(x, n_own, xt, n_tiles, tile, Dp):
    """Keys in two segments: (B, K, S, Dh) whose first n_own rows are a sequence's own keys and
    the rest extra keys (merged attention) -> (B, K, n_tiles, tile, Dp), the own keys from
    tile 0 and the extra keys from tile xt on, so that no tile mixes the two. Zero-padded."""
    B, K, S, Dh = x.shape
    out = np.zeros((B, K, n_tiles * tile, Dp), x.dtype)
    out[:, :, :n_own, :Dh] = x[:, :, :n_own]
    out[:, :, xt * tile:xt * tile + S - n_own, :Dh] = x[:, :, n_own:]
    return out.reshape(B, K, n_tiles, tile, Dp)


def untile_keys(x, n_own, xt, S, Dh):
    """Inverts tile_keys: (B, K, n_tiles, tile, Dp) -> (B, K, S, Dh)."""
    B, K, n, tile, Dp = x.shape
    rows = x.reshape(B, K, n * tile, Dp)
    if n_own == S:
        return np.ascontiguousarray(rows[:, :, :S, :Dh])
    return np.concatenate([rows[:, :, :n_own, :Dh], rows[:, :, xt * tile:xt * tile + S - n_own, :Dh]], axis=2)
