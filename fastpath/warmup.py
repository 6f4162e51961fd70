"""Compile every kernel up front (or load it from Numba's on-disk cache), timed, so the cost
is seen once instead of hiding in the first training step. The commands call this through
minencdec.model.backend.prepare."""

import sys
import time
from types import SimpleNamespace

import numpy as np

from . import attention, block, decode, decoder, lmhead, mlp, norm, optim
from .jit import jit_enabled


def _decoder_step(rng, dt, merged, B):
    """Two steps of a one-layer decoder of B rows (the kernels' every signature: QK-norm and
    RoPE, cross or merged keys, a few-rows product; B = 1 makes some views contiguous, which
    Numba compiles apart)."""
    D, H, K, Dh, F, S = 8, 2, 1, 4, 6, 3
    rand = lambda *shape: rng.standard_normal(shape).astype(dt)   # noqa: E731
    ones = np.ones(D, dt)
    layer = dict(pre_self=ones, post_self=ones, qkv=rand((H + 2 * K) * Dh, D), q_norm=np.ones(Dh, dt),
                 k_norm=np.ones(Dh, dt), o=rand(D, H * Dh), window=2, rope="r", pre_mlp=ones, post_mlp=ones,
                 cross=None if merged else (ones, ones, rand(H * Dh, D), rand(D, H * Dh)), gu=rand(2 * F, D),
                 down=rand(D, F))
    cache = SimpleNamespace(valid=np.ones((B, 1), bool), slots=[np.array([0])], keys=[rand(B, K, 1, Dh)],
                            values=[rand(B, K, 1, Dh)])
    dec = decoder.Decoder([layer], ones, (H, K, Dh), 1e-6, 0.5, 5.0, cache, 2, [(rand(B, K, S, Dh), rand(B, K, S, Dh))],
                          np.ones((B, S), bool), (np.array([0]), np.array([S - 1])), merged)
    for _ in range(2):
        dec.step(rand(B, D), {"r": (rand(B, Dh), rand(B, Dh))})


def compile_all(verbose=True):
    """Compile (or load from the on-disk cache) every kernel for float32 and float64 by
    running each on a tiny input, and return the seconds it took. The first run in a fresh
    checkout pays the compile; later runs only load the cache."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        q = rng.standard_normal((1, 2, 3, 4)).astype(dt)
        kv = rng.standard_normal((1, 1, 5, 4)).astype(dt)
        for method in ("tiled", "dense"):
            o, c = attention.attention_forward(q, kv, kv, 0.5, 5.0, causal=True, q_offset=2, method=method)
            attention.attention_backward(o, c)
        decode.decode_attention(q[:, :, :1], kv, kv, 0.5, 5.0, causal=True, q_offset=4)
        P = rng.standard_normal((1, 3, 8)).astype(dt)
        hq, rstd = block.heads(P, 0, 2, 4, np.zeros(4, dt), 1e-6, (P[0, :, :4], P[0, :, 4:]))
        block.heads_backward(hq, 0, P, 0, np.zeros(4, dt), rstd, (P[0, :, :4], P[0, :, 4:]), np.empty_like(P))
        x = rng.standard_normal((2, 4)).astype(dt)
        y, nc = norm.rmsnorm_forward(x, x[0], 1e-6)
        norm.rmsnorm_backward(y, nc)
        lmhead.lm_head_cross_entropy(x, rng.standard_normal((6, 4)).astype(dt), np.array([1, -100]), 3.0)
        mlp.geglu_backward(x[:, :2], x)
        mlp.geglu_forward(x)
        optim.adamw_update(x[0].copy(), x[1].copy(), x[0].copy(), x[1] ** 2, 0.9, 0.9, 0.95, 1e-3, 0.5, 1e-8)
        for merged in (False, True):
            for B in (1, 2):
                _decoder_step(rng, dt, merged, B)
    seconds = time.perf_counter() - t0
    if verbose:
        print(f"fastpath: kernels ready in {seconds:.1f} s "
              f"({'compiled or loaded from the cache' if jit_enabled() else 'NUMBA_DISABLE_JIT=1: pure Python'})",
              file=sys.stderr)                          # stderr: stdout may be a generated text stream
    return seconds
