"""Compile every kernel up front (or load it from Numba's on-disk cache), timed, so the cost
is seen once instead of hiding in the first training step. The commands call this through
minencdec.model.backend.prepare."""

import sys
import time

import numpy as np

from . import attention, decode, lmhead, mlp, norm
from .jit import jit_enabled


def compile_all(verbose=True):
    """Compile (or load from the on-disk cache) every kernel for float32 and float64 by
    running each on a tiny input, and return the seconds it took. The first run in a fresh
    checkout pays the compile; later runs only load the cache."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        q = rng.standard_normal((1, 2, 3, 4)).astype(dt)
        kv = rng.standard_normal((1, 1, 5, 4)).astype(dt)
        o, c = attention.attention_forward(q, kv, kv, 0.5, 5.0, causal=True, q_offset=2)
        attention.attention_backward(o, c)
        decode.decode_attention(q[:, :, :1], kv, kv, 0.5, 5.0, causal=True, q_offset=4)
        x = rng.standard_normal((2, 4)).astype(dt)
        y, nc = norm.rmsnorm_forward(x, x[0], 1e-6)
        norm.rmsnorm_backward(y, nc)
        lmhead.lm_head_cross_entropy(x, rng.standard_normal((6, 4)).astype(dt), np.array([1, -100]), 3.0)
        mlp.geglu_backward(x, x, x)
        mlp.geglu_forward(x, x)
    seconds = time.perf_counter() - t0
    if verbose:
        print(f"fastpath: kernels ready in {seconds:.1f} s "
              f"({'compiled or loaded from the cache' if jit_enabled() else 'NUMBA_DISABLE_JIT=1: pure Python'})",
              file=sys.stderr)                          # stderr: stdout may be a generated text stream
    return seconds
