"""The dense attention path (fastpath/dense.py: the scores as BLAS products, one Numba pass
per row) against the NumPy reference, and the choice between it and the tiled kernel.

The oracle is minencdec.model.attention (test_fastpath.py's check_against_reference, with
its natural-scale tolerances); the cases are test_fastpath.py's Hypothesis strategy (every
mask description, GQA, padding, empty rows, merged keys, softcap on and off, float32 and
float64), run with method="dense". Then: the output written into a view of merged heads and a
strided do (what the fused attention block passes), the lanes splitting the work, the
eight-way row max, the choice by size (and that long sequences stay memory-linear), and
negative controls showing that a row pass ignoring the padding, the extra keys or the
softcap's slope is caught.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import attention as R

from fastpath import attention as F
from fastpath import blas, dense
from test_fastpath import _case, attention_cases, check_against_reference, description, reference_mask, rtol


def dense_forward(*args, **kw):
    return F.attention_forward(*args, **{**kw, "block": None, "method": "dense"})


@given(attention_cases())
def test_dense_matches_reference(c):
    check_against_reference(c, forward=dense_forward)


@given(attention_cases())
def test_dense_masked_keys_and_empty_rows_get_exact_zeros(c):
    o, cache = dense_forward(c.q, c.k, c.v, c.scale, c.cap, **description(c))
    dq, dk, dv = F.attention_backward(c.do, cache)
    mask = np.broadcast_to(reference_mask(c), (c.B, c.T, c.S))
    unseen_keys, empty_rows = ~mask.any(axis=1), ~mask.any(axis=2)
    for b in range(c.B):
        assert np.all(dk[b][:, unseen_keys[b]] == 0) and np.all(dv[b][:, unseen_keys[b]] == 0)
        assert np.all(o[b][:, empty_rows[b]] == 0) and np.all(dq[b][:, empty_rows[b]] == 0)


def _merged_case(dtype, seed=0):
    """B 2, H 4 over K 2 kv heads, 40 queries, 40 own keys (causal, window 9, padding) then 23
    encoder keys, 3 of them padded in row 1."""
    c = _case(dtype=np.float64, B=2, H=4, K=2, T=40, S=63, Dh=6, window=9, extra_keys=23,
              key_mask=np.arange(40)[None] >= np.array([[0], [5]]), extra_key_mask=np.arange(23)[None] < [[23], [20]])
    rng = np.random.default_rng(seed)
    c.q, c.do = (rng.standard_normal((2, 4, 40, 6)).astype(dtype) for _ in range(2))
    c.k, c.v = (rng.standard_normal((2, 2, 63, 6)).astype(dtype) for _ in range(2))
    c.dtype = dtype
    return c


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_output_into_a_merged_heads_view_and_a_strided_gradient(dtype):
    """o written into a (B, T, H Dh) array seen as (B, H, T, Dh), and do given as such a view:
    what fastpath/block.py passes to avoid two copies."""
    c = _merged_case(dtype)
    B, H, T, Dh = c.q.shape
    o_ref, cache_ref = R.attention_forward(c.q, c.k, c.v, reference_mask(c), c.scale, c.cap)
    merged = np.full((B, T, H * Dh), np.nan, dtype)
    view = merged.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
    o, cache = dense_forward(c.q, c.k, c.v, c.scale, c.cap, **description(c), out=view)
    assert o is view and not np.isnan(merged).any()
    assert_close("o", view, o_ref, rtol(dtype), atol=rtol(dtype) * np.abs(c.v).max())
    do_merged = np.ascontiguousarray(c.do.transpose(0, 2, 1, 3)).reshape(B, T, H * Dh)
    do_view = do_merged.reshape(B, T, H, Dh).transpose(0, 2, 1, 3)
    for name, got, want in zip(("dq", "dk", "dv"), F.attention_backward(do_view, cache),
                               R.attention_backward(c.do, cache_ref)):
        assert_close(name, got, want, rtol(dtype) * 10, atol=rtol(dtype) * 10 * np.abs(want).max())


def test_lanes_split_the_items(monkeypatch):
    """With the work split over the lanes (chunks of one item), the same numbers."""
    monkeypatch.setattr(dense, "PARALLEL_WORK", 0)
    monkeypatch.setattr(dense, "CHUNK_BYTES", 1)
    check_against_reference(_merged_case(np.float64), forward=dense_forward)


def test_one_blas_thread_restores_the_count_even_on_an_error():
    before = [lib.get_num_threads() for lib in blas._controllers()]
    with pytest.raises(RuntimeError):
        with blas.one_blas_thread():
            assert all(lib.get_num_threads() == 1 for lib in blas._controllers())
            raise RuntimeError("inside")
    assert [lib.get_num_threads() for lib in blas._controllers()] == before


@given(st.integers(0, 40), st.integers(0, 2**32 - 1), st.sampled_from([np.float32, np.float64]),
       st.floats(0.0, 1.0))
def test_row_max_against_numpy(n, seed, dtype, hidden):
    """Eight running maxima against np.max, with runs of -inf (masked scores) and short rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(dtype)
    x[rng.random(n) < hidden] = -np.inf
    want = max(-np.inf, np.max(x, initial=-np.inf))
    assert dense.row_max(x, dtype(-np.inf)) == want


def test_chooser_dense_at_training_lengths_tiled_when_long():
    """Small's training shapes go dense; T = 2048 (a (8, 2048, 2048) array would be 128 MiB)
    and a window far shorter than the sequence stay tiled."""
    def choice(B, H, T, causal, window):
        lo, hi = F.visible_intervals(T, T, causal, window)
        return dense.choose(B, H, T, T, 4, F._tiled_pairs(lo, hi, T, 0))
    assert choice(8, 8, 256, False, None) == choice(8, 8, 256, True, None) == "dense"
    assert choice(1, 8, 2048, True, None) == "tiled"
    assert choice(1, 8, 1024, True, 128) == "tiled"


def test_auto_stays_memory_linear_at_long_lengths():
    """method="auto" (what the models ask for) at T and 2T past the dense budget: the tiled
    kernel's linear memory."""
    rng = np.random.default_rng(0)
    # Compile first: in a fresh checkout (no Numba cache yet) the compiler's own allocations
    # would be traced too (18 MB, measured).
    q = rng.standard_normal((1, 2, 64, 8)).astype(np.float32)
    o, cache = F.attention_forward(q, q, q, 0.25, 50.0, causal=True, window=64, method="tiled")
    F.attention_backward(o, cache)
    peaks = []
    for T in (2048, 4096):
        q = rng.standard_normal((1, 2, T, 8)).astype(np.float32)
        tracemalloc.start()
        o, cache = F.attention_forward(q, q, q, 0.25, 50.0, causal=True, window=64, method="auto")
        F.attention_backward(o, cache)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert isinstance(cache, F.FlashCache)
        assert peaks[-1] < 2 * T * T * 4 / 8                      # an eighth of one (H, T, T) score array
    assert peaks[1] < 2.5 * peaks[0], peaks


def test_an_unknown_method_is_refused():
    c = _case()
    with pytest.raises(ValueError, match="method must be one of"):
        F.attention_forward(c.q, c.k, c.v, c.scale, c.cap, method="fast")

# ---------------------------------------------------------------------------- negative controls


def test_negative_control_ignoring_padding_fails(monkeypatch):
    c = _merged_case(np.float64)
    check_against_reference(c, forward=dense_forward)
    monkeypatch.setattr(F, "_dense_validity", lambda B, n, E, km, em: np.ones((B, n + E), bool))
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=dense_forward)


def test_negative_control_extra_keys_read_as_own_keys_fails(monkeypatch):
    """A row pass that puts the encoder keys under the causal window (n_own = S) must fail."""
    c = _merged_case(np.float64)
    forward = dense.attention_forward
    monkeypatch.setattr(dense, "attention_forward", lambda q, k, v, scale, cap, kvalid, lo, hi, n_own, out=None:
                        forward(q, k, v, scale, cap, kvalid, lo, hi, k.shape[2], out))
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=dense_forward)


def test_negative_control_backward_without_softcap_slope_fails(monkeypatch):
    c = _merged_case(np.float64)
    c.cap = 2.0                                                   # a cap that bites: the slope matters
    check_against_reference(c, forward=dense_forward)
    backward = dense.attention_backward
    monkeypatch.setattr(dense, "attention_backward", lambda do, cache: backward(do, cache._replace(cap=0.0)))
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=dense_forward)
