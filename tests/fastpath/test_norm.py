"""The fast RMSNorm (fastpath/norm.py) against the reference (minencdec.model.layers).

The model's norms over (B, T, D) rows, and Gemma 3's QK-norm over head_dim of the heads
attention._split_heads makes (a transposed view of the projection): the same numbers, the
outputs laid out as the inputs, the caches interchangeable, and no fallback to the reference.
Tolerances as in test_fastpath.py; dx is held to its size before the cancellation in
dxhat - xhat mean(dxhat xhat), dw sums the rows in another order (10x the tolerance).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import layers as L

from fastpath import norm as N
from test_fastpath import rtol


@contextlib.contextmanager
def rows_split(split):
    """With split, the norm kernels share even a few rows among every lane (these tests'
    sizes are below norm.PARALLEL_WORK, so they would run on one)."""
    threshold = N.PARALLEL_WORK
    N.PARALLEL_WORK = 0 if split else threshold
    try:
        yield
    finally:
        N.PARALLEL_WORK = threshold


@given(st.sampled_from([np.float64, np.float32]), st.lists(st.integers(1, 5), min_size=0, max_size=2),
       st.integers(1, 70), st.integers(0, 2**32 - 1), st.booleans())
def test_rmsnorm_matches_reference(dtype, lead, D_, seed, split):
    with rows_split(split):
        _check_rmsnorm(dtype, lead, D_, seed)


def _check_rmsnorm(dtype, lead, D_, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, D_)) * rng.uniform(0.01, 10)).astype(dtype)
    w = rng.normal(0, 0.5, D_).astype(dtype)                      # non-zero offsets: zeros would hide a missing "1 +"
    y_ref, c_ref = L.rmsnorm_forward(x, w, 1e-6)
    y, c = N.rmsnorm_forward(x, w, 1e-6)
    assert_close("rmsnorm y", y, y_ref, rtol(dtype))
    _check_backward(rng.standard_normal(x.shape).astype(dtype), w, c, c_ref)


def _check_backward(dy, w, cache, cache_ref):
    """dx, dw of the fast backward against the reference's, from either forward's cache."""
    tol = rtol(dy.dtype)
    xhat, rstd = cache_ref[0].astype(np.float64), cache_ref[1].astype(np.float64)
    dxhat = np.abs(dy * (1.0 + w))                                # dx = rstd (dxhat - xhat mean(dxhat xhat)):
    scales = (np.max(rstd * (dxhat + np.abs(xhat) * np.mean(dxhat * np.abs(xhat), -1, keepdims=True)), initial=0),
              np.max(np.abs(dy * xhat).reshape(-1, dy.shape[-1]).sum(axis=0)))   # sizes before the cancellations
    for got, want, name, s in zip(N.rmsnorm_backward(dy, cache), L.rmsnorm_backward(dy, cache_ref), ("dx", "dw"), scales):
        assert_close(name, got, want, tol * 10, atol=tol * s)     # dw sums N rows in another order
    for got, want, s in zip(N.rmsnorm_backward(dy, cache_ref), L.rmsnorm_backward(dy, cache), scales):   # caches interchange
        assert_close("cross cache", got, want, tol * 10, atol=tol * s)


@given(st.sampled_from([np.float64, np.float32]), st.integers(1, 3), st.integers(1, 4), st.integers(1, 9),
       st.sampled_from([2, 6, 256]), st.integers(0, 2**32 - 1), st.booleans())
def test_qk_norm_on_split_heads(dtype, B, H, T, Dh, seed, split):
    """RMSNorm over head_dim of (B, H, T, Dh) heads that are a transposed view of a
    (B, T, H, Dh) projection (attention._split_heads): the reference's numbers, forward and
    backward (the dy of either layout), with y and dx laid out as x is. `split`: the rows
    go to every lane however few they are (rows_split)."""
    with rows_split(split):
        _check_qk_norm(dtype, B, H, T, Dh, seed)


def _check_qk_norm(dtype, B, H, T, Dh, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, T, H, Dh)) * rng.uniform(0.1, 10)).astype(dtype).transpose(0, 2, 1, 3)
    w = rng.normal(0, 0.5, Dh).astype(dtype)                      # non-zero offsets
    y, cache = N.rmsnorm_forward(x, w, 1e-6)
    y_ref, cache_ref = L.rmsnorm_forward(x, w, 1e-6)
    assert_close("qk-norm y", y, y_ref, rtol(dtype))
    assert y.transpose(0, 2, 1, 3).flags.c_contiguous            # rows where x's were: merging is a reshape
    for dy in (rng.standard_normal((B, H, T, Dh)).astype(dtype),
               rng.standard_normal((B, T, H, Dh)).astype(dtype).transpose(0, 2, 1, 3)):
        _check_backward(dy, w, cache, cache_ref)
        assert N.rmsnorm_backward(dy, cache)[0].transpose(0, 2, 1, 3).flags.c_contiguous   # dx laid out as x


def test_qk_norm_runs_in_the_kernel(monkeypatch):
    """The fast norm on the model's QK-norm input (float32 heads view, (Dh,) weight) never
    hands it to the reference; a float16 input does, which shows the spy sees a fallback."""
    fallbacks = []
    for name in ("rmsnorm_forward", "rmsnorm_backward"):
        monkeypatch.setattr(N.reference, name, lambda *a, _n=name: fallbacks.append(_n))
    x = np.ones((2, 5, 3, 256), np.float32).transpose(0, 2, 1, 3)
    y, cache = N.rmsnorm_forward(x, np.zeros(256, np.float32), 1e-6)
    N.rmsnorm_backward(y, cache)
    assert fallbacks == []
    N.rmsnorm_forward(x.astype(np.float16), np.zeros(256, np.float16), 1e-6)
    assert fallbacks == ["rmsnorm_forward"]


def test_negative_control_rows_put_back_in_memory_order(monkeypatch):
    """A layout slip (the rows returned in x's memory order, (B, T, H), read as (B, H, T))
    must fail the QK-norm check."""
    _check_qk_norm(np.float64, 2, 3, 4, 6, 0)
    monkeypatch.setattr(N, "_from_rows", lambda rows, shape, order: rows.reshape(shape))
    with pytest.raises(AssertionError):
        _check_qk_norm(np.float64, 2, 3, 4, 6, 0)
