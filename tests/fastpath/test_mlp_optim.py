"""The fused MLP (fastpath/mlp.py), the fused AdamW update (fastpath/optim.py), the handed-over
LM-head cache (fastpath/lmhead.py) and the lanes' fallback (fastpath/jit.py), each against an
independent oracle.

    MLP     minencdec.model.layers.mlp_forward/backward, Hypothesis over shapes, both dtypes
    AdamW   the same update written out in float64 NumPy here, and NumPy's float32 / float64
            rounding line by line (the kernel must give the same bits; tests/training/
            test_optim.py holds the optimizer to torch's AdamW)
    lanes   a pool thread that never starts: run_lanes must still finish every lane
Negative controls: a GeGLU with the tanh constant off by 1%, and an update with eps inside
the square root, are caught.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import layers as L

from fastpath import jit, lmhead, mlp, optim

RTOL = {np.float64: 1e-12, np.float32: 2e-5}


@given(st.sampled_from([np.float64, np.float32]), st.integers(1, 3), st.integers(1, 9), st.integers(1, 12),
       st.integers(1, 20), st.integers(0, 2**32 - 1))
def test_mlp_matches_reference(dtype, B, T, D, F, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)).astype(dtype)
    wg, wu, wd = (rng.normal(0, 0.5, s).astype(dtype) for s in ((F, D), (F, D), (D, F)))
    dy = rng.standard_normal((B, T, D)).astype(dtype)
    y_ref, c_ref = L.mlp_forward(x, wg, wu, wd)
    y, c = mlp.mlp_forward(x, wg, wu, wd)
    assert_close("y", y, y_ref, RTOL[dtype])
    for name, got, want in zip(("dx", "dw_gate", "dw_up", "dw_down"), mlp.mlp_backward(dy, c),
                               L.mlp_backward(dy, c_ref)):
        assert got.dtype == dtype and got.shape == want.shape
        assert_close(name, got, want, RTOL[dtype] * 10)


def test_negative_control_geglu_constant_off_fails(monkeypatch):
    rng = np.random.default_rng(0)
    x, wg, wu, wd = rng.standard_normal((4, 6)), *(rng.normal(0, 0.5, s) for s in ((8, 6), (8, 6), (6, 8)))
    assert_close("y", mlp.mlp_forward(x, wg, wu, wd)[0], L.mlp_forward(x, wg, wu, wd)[0], 1e-12)
    monkeypatch.setattr(mlp, "_consts", lambda dt: (dt(mlp._C * 1.01), dt(mlp._K), dt(0.5), dt(1)))
    with pytest.raises(AssertionError):
        assert_close("y", mlp.mlp_forward(x, wg, wu, wd)[0], L.mlp_forward(x, wg, wu, wd)[0], 1e-12)

# ---------------------------------------------------------------------------- AdamW


def numpy_update(p, g, m, v, decay, b1, b2, step, bc2, eps):
    """The update as training.optim.AdamW's NumPy loop writes it (Python floats cast to the
    arrays' dtype by NumPy, one rounding per operation)."""
    p *= decay
    m *= b1
    m += (1.0 - b1) * g
    v *= b2
    v += (1.0 - b2) * (g * g)
    p -= step * (m / (np.sqrt(v) / bc2 + eps))


@given(st.sampled_from([np.float64, np.float32]), st.integers(1, 3000), st.integers(0, 2**32 - 1),
       st.floats(-8, 2), st.booleans())
def test_adamw_kernel_gives_numpys_bits(dtype, n, seed, log_scale, decays):
    rng = np.random.default_rng(seed)
    p, g = (rng.standard_normal(n) * 10.0 ** log_scale).astype(dtype), rng.standard_normal(n).astype(dtype)
    m, v = (rng.standard_normal(n) * 0.1).astype(dtype), (rng.random(n) * 0.01).astype(dtype)
    args = (1 - 3e-3 * 0.1 if decays else 1.0, 0.9, 0.95, 3e-3 / (1 - 0.9 ** 7), math.sqrt(1 - 0.95 ** 7), 1e-8)
    want = [a.copy() for a in (p, g, m, v)]
    numpy_update(*want, *args)
    optim.adamw_update(p, g, m, v, *args)
    for name, got, w in zip("pgmv", (p, g, m, v), want):
        assert np.array_equal(got, w), name


def test_adamw_kernel_splits_big_tensors_over_lanes():
    """A tensor past PARALLEL_WORK (the lanes' share boundaries inside it), against float64."""
    rng = np.random.default_rng(0)
    n = optim.PARALLEL_WORK * 2 + 17
    p, g, m = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n) * 0.1
    v = rng.random(n) * 0.01
    p64 = p * 0.999
    m64 = 0.9 * m + 0.1 * g
    v64 = 0.95 * v + 0.05 * g * g
    p64 -= 0.01 * m64 / (np.sqrt(v64) / 0.3 + 1e-8)
    optim.adamw_update(p, g, m, v, 0.999, 0.9, 0.95, 0.01, 0.3, 1e-8)
    assert_close("p", p, p64, 1e-14)
    assert_close("v", v, v64, 1e-14)


def test_negative_control_eps_inside_the_sqrt_gives_other_bits():
    rng = np.random.default_rng(0)
    p, g, m, v = (rng.standard_normal(100).astype(np.float32) for _ in range(4))
    v = np.abs(v) * 1e-9
    want = [a.copy() for a in (p, g, m, v)]
    numpy_update(*want, 1.0, 0.9, 0.95, 1e-3, 0.5, 1e-8)
    optim.adamw_update(p, g, m, v, 1.0, 0.9, 0.95, 1e-3, 0.5, 1e-8)
    assert np.array_equal(p, want[0])
    bad = [a.copy() for a in want]
    bad[0] -= 1e-3 * (bad[2] / np.sqrt(bad[3] / 0.25 + np.float32(1e-8)))    # eps under the sqrt
    assert not np.array_equal(p, bad[0])


def test_adamw_kernel_refuses_mismatched_tensors():
    a = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32 or float64"):
        optim.adamw_update(a, np.zeros(4), a.copy(), a.copy(), 1.0, 0.9, 0.95, 1e-3, 0.5, 1e-8)
    with pytest.raises(ValueError, match="of one shape"):
        optim.adamw_update(a, np.zeros(5, np.float32), a.copy(), a.copy(), 1.0, 0.9, 0.95, 1e-3, 0.5, 1e-8)

# ---------------------------------------------------------------------------- LM head, lanes


def test_lm_head_cache_serves_one_backward():
    """The backward hands over the forward's arrays (the models add into dtable in place), so a
    second backward on the same cache is an error, not a silently changed gradient."""
    rng = np.random.default_rng(0)
    loss, cache = lmhead.lm_head_cross_entropy(rng.standard_normal((3, 4)), rng.standard_normal((9, 4)),
                                               np.array([1, 2, 3]), 30.0)
    dh, dtable = lmhead.lm_head_cross_entropy_backward(cache)
    with pytest.raises(ValueError, match="used by an earlier backward"):
        lmhead.lm_head_cross_entropy_backward(cache)


@jit.kernel
def _fill(lane, n_lanes, out):
    for i in range(lane, out.shape[0], n_lanes):
        out[i] = lane + 1


def test_run_lanes_finishes_when_the_pool_thread_never_starts():
    """The pool's only thread is held up (as a descheduled thread on a loaded machine): lane 1
    runs on the calling thread instead, and every lane's share is done."""
    jit.run_lanes(_fill, 2, np.zeros(4))                          # make the pool (one thread for 2 lanes)
    release = threading.Event()
    blocker = jit._pool.submit(release.wait, 30)
    try:
        out = np.zeros(6)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (jit.run_lanes(_fill, 2, out), done.set()))
        worker.start()
        assert done.wait(10), "run_lanes waited for a thread that never started"
        assert out.tolist() == [1, 2, 1, 2, 1, 2]
    finally:
        release.set()
        blocker.result()
