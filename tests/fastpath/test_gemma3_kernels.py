"""The fast attention's T5Gemma 2 cases, against the NumPy reference:

  - the T5Gemma 2 encoder's window rule ("t5gemma2": -((w - 1) // 2) <= j - i <= w // 2);
  - merged attention (T5Gemma 2's decoder): own keys under the causal / window / padding
    description, then encoder keys every query sees unless padded (`Mask.extra_keys`), in the
    tiled kernel (forward, backward) and in the decode step.

(Gemma 3's QK-norm, RMSNorm over head_dim of the split heads, is in test_norm.py.)

The Hypothesis properties over every description (these included) are in test_fastpath.py;
here are the cases at the models' sizes (past the 64-wide tiles), the negative controls that
show a kernel reading encoder keys wrongly is caught, tile skipping, memory, and the errors.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from helpers import assert_close
from minencdec.model import attention as R
from minencdec.model import backend

from fastpath import attention as F
from fastpath import decode as D
from test_fastpath import check_against_reference, description, rtol


def _problem(B=2, H=4, K=2, T=150, n=None, E=0, Dh=8, dtype=np.float64, seed=0, **desc):
    """Random q, k, v, do with n own keys (default T) then E extra keys, as test_fastpath's cases."""
    from types import SimpleNamespace
    rng = np.random.default_rng(seed)
    n = T if n is None else n
    c = SimpleNamespace(dtype=dtype, B=B, H=H, K=K, T=T, S=n + E, Dh=Dh, causal=False, window=None, rule="le",
                        key_mask=None, q_offset=0, extra_keys=E, extra_key_mask=None, cap=50.0, scale=0.35,
                        block=(64, 64))
    c.__dict__.update(desc)
    c.q = (rng.standard_normal((B, H, T, Dh)) * 2).astype(dtype)
    c.k, c.v = (rng.standard_normal((2, B, K, n + E, Dh)) * 2).astype(dtype)
    c.do = rng.standard_normal((B, H, T, Dh)).astype(dtype)
    return c


def _padding(B, L, pads):
    """(B, L) key mask: row r has pads[r] padded keys at the end (row 2: at the start)."""
    mask = np.ones((B, L), bool)
    for r in range(B):
        p = pads[r % 3]
        if r % 3 == 2:
            mask[r, :p] = False
        elif p:
            mask[r, L - p:] = False
    return mask


def _check_decode(c, decode=D.decode_attention):
    want = R.attention_forward(c.q, c.k, c.v, F.dense_mask(c.T, c.S, **description(c)), c.scale, c.cap)[0]
    got = decode(c.q, c.k, c.v, c.scale, c.cap, **description(c))
    assert_close("decode o", got, want, rtol(c.dtype), atol=rtol(c.dtype) * np.abs(c.v).max())

# ---------------------------------------------------------------------------- 1. the T5Gemma 2 window rule


@pytest.mark.parametrize("window", [7, 8, 200])                  # odd, even, longer than the sequence
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_t5gemma2_window_rule_past_the_tiles(window, dtype):
    """The encoder's sliding layers at T = 150 (three 64-row tiles), GQA 2, padded keys."""
    c = _problem(B=3, dtype=dtype, window=window, rule="t5gemma2", key_mask=_padding(3, 150, (0, 5, 9)))
    check_against_reference(c)
    _check_decode(c)


def test_negative_control_t5gemma2_rule_read_as_le():
    """With w = 4, "t5gemma2" sees j - i in [-1, 2] and "le" |i - j| <= 4: a kernel reading one
    as the other must fail."""
    c = _problem(T=20, window=4, rule="t5gemma2", block=(8, 8))
    check_against_reference(c)
    as_le = lambda *a, **kw: F.attention_forward(*a, **{**kw, "rule": "le"})   # noqa: E731
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=as_le)

# ---------------------------------------------------------------------------- 2. merged attention


def _merged(T=150, S=131, window=70, dtype=np.float64, B=3, **kw):
    """T5Gemma 2's decoder self-attention: T own keys (causal, window), S encoder keys, both padded."""
    return _problem(B=B, T=T, E=S, dtype=dtype, causal=True, window=window,
                    key_mask=_padding(B, T, (0, 0, 4)), extra_key_mask=_padding(B, S, (0, 7, 3)), **kw)


@pytest.mark.parametrize("window", [None, 5, 70, 400])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merged_attention_past_the_tiles(window, dtype):
    """T = 150 queries over 150 own + 131 encoder keys (S != T), the tiles' default size 64:
    forward and backward."""
    check_against_reference(_merged(window=window, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merged_decode_step_as_generation_calls_it(dtype):
    """One new query (T = 1) at q_offset = 40 over 41 cached own keys of a window of 16, then
    the 131 encoder keys, padded: the numba backend's decode step against the reference's."""
    c = _merged(T=1, n=41, S=131, window=16, dtype=dtype, q_offset=40)
    c.key_mask = _padding(3, 41, (0, 0, 30))
    mask = R.Mask(causal=True, window=16, key_mask=c.key_mask, q_offset=40, extra_keys=131,
                  extra_key_mask=c.extra_key_mask)
    want = backend.kernels("numpy").decode_attention(c.q, c.k, c.v, mask, c.scale, c.cap)
    got = backend.kernels("numba").decode_attention(c.q, c.k, c.v, mask, c.scale, c.cap)
    assert_close("decode o", got, want, rtol(dtype), atol=rtol(dtype) * np.abs(c.v).max())
    _check_decode(c)


def _encoder_keys_causal(kernel):
    """A wrong fast path: `kernel` told that the encoder keys are more own keys (so the
    causal rule and the window apply to them)."""
    def wrong(q, k, v, scale, cap=None, extra_keys=0, extra_key_mask=None, key_mask=None, **kw):
        n, B = k.shape[2] - extra_keys, q.shape[0]
        masks = [np.ones((B, n), bool) if key_mask is None else key_mask,
                 np.ones((B, extra_keys), bool) if extra_key_mask is None else extra_key_mask]
        return kernel(q, k, v, scale, cap, key_mask=np.concatenate(masks, axis=1), **kw)
    return wrong


def test_negative_control_encoder_keys_read_causally():
    """A kernel that treats the encoder keys as more own keys (causal, windowed) must be
    caught, in the tiled attention and in the decode step."""
    c = _merged(T=20, S=12, window=6, block=(8, 8))
    check_against_reference(c)
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=_encoder_keys_causal(F.attention_forward))
    d = _merged(T=1, n=9, S=12, window=6, q_offset=8)
    d.key_mask = None
    _check_decode(d)
    with pytest.raises(AssertionError):
        _check_decode(d, decode=_encoder_keys_causal(D.decode_attention))


def test_negative_control_encoder_padding_ignored():
    c = _merged(T=20, S=12, window=6, block=(8, 8))
    check_against_reference(c)
    without = lambda *a, **kw: F.attention_forward(*a, **{**kw, "extra_key_mask": None})   # noqa: E731
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=without)
    with pytest.raises(AssertionError):
        _check_decode(c, decode=lambda *a, **kw: D.decode_attention(*a, **{**kw, "extra_key_mask": None}))


def _poisoned(c, n_hidden_tail):
    """Puts NaN into the keys and values no query may see, in whole tiles: the last
    n_hidden_tail own keys, and every encoder key of a batch row whose encoder keys are all
    padding. A kernel that computed such a tile (p = 0 times NaN) returns NaN."""
    n = c.S - c.extra_keys
    k, v = c.k.copy(), c.v.copy()
    k[:, :, n - n_hidden_tail:n] = v[:, :, n - n_hidden_tail:n] = np.nan
    empty = ~c.extra_key_mask.any(axis=1)
    k[empty, :, n:] = v[empty, :, n:] = np.nan
    return k, v


def _hidden_tiles_case():
    """10 causal queries over 20 own keys (keys 10-19 hidden from all; 12-19 are whole 4-key
    tiles) and 9 encoder keys, all padding in batch row 1."""
    c = _problem(B=2, H=2, K=1, T=10, n=20, E=9, Dh=4, causal=True, window=3, block=(4, 4),
                 extra_key_mask=np.array([[1] * 9, [0] * 9], bool))
    k, v = _poisoned(c, 8)
    return c, k, v


def _run_poisoned(c, k, v):
    o, cache = F.attention_forward(c.q, k, v, c.scale, c.cap, **description(c), block=c.block)
    return (o,) + F.attention_backward(c.do, cache)


def test_fully_hidden_tiles_are_skipped():
    """The tiles no query may see are never computed (forward and backward): NaN put there
    stays out of every output, which equals the reference's on the same keys zeroed."""
    c, k, v = _hidden_tiles_case()
    got = _run_poisoned(c, k, v)
    c.k, c.v = np.nan_to_num(k, nan=0.0), np.nan_to_num(v, nan=0.0)
    o_ref, cache = R.attention_forward(c.q, c.k, c.v, F.dense_mask(c.T, c.S, **description(c)), c.scale, c.cap)
    want = (o_ref,) + R.attention_backward(c.do, cache)
    n = c.S - c.extra_keys
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        if name in ("dk", "dv"):                                  # NaN keys: their gradient is exactly 0
            assert np.all(g[:, :, n - 8:n] == 0) and np.all(g[1, :, n:] == 0), name
        assert np.all(np.isfinite(g)), name
        assert_close(name, g, w, 1e-12)


def test_negative_control_a_kernel_that_computes_hidden_tiles_is_caught(monkeypatch):
    """The NaN check above fails when the kernel walks every own-key tile, or the encoder
    tiles that hold only padding."""
    c, k, v = _hidden_tiles_case()
    with monkeypatch.context() as m:                              # every own-key tile for every query tile
        m.setattr(F, "_tile_bounds", lambda lo, hi, S, n_tiles, tile: (np.zeros(n_tiles, np.int64),
                                                                         np.full(n_tiles, S - 1, np.int64)))
        assert not all(np.all(np.isfinite(g)) for g in _run_poisoned(c, k, v))
    validity = F._key_validity
    monkeypatch.setattr(F, "_key_validity", lambda *a: (lambda kv, kt: (kv, np.maximum(kt, 1)))(*validity(*a)))
    assert not all(np.all(np.isfinite(g)) for g in _run_poisoned(c, k, v))   # padded encoder tiles walked


def test_merged_attention_memory_grows_linearly():
    """tracemalloc peak of forward + backward for T = S and 2T = 2S: about x2, far below one
    T x (T + S) score array (the reference's mask alone is one)."""
    rng = np.random.default_rng(0)
    peaks = []
    for T in (256, 512):
        q = rng.standard_normal((1, 2, T, 16))
        kv = rng.standard_normal((1, 1, 2 * T, 16))
        enc_mask = np.ones((1, T), bool)
        enc_mask[0, -5:] = False
        tracemalloc.start()
        o, cache = F.attention_forward(q, kv, kv, 0.25, 50.0, causal=True, window=64, extra_keys=T,
                                       extra_key_mask=enc_mask)
        F.attention_backward(o, cache)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert peaks[-1] < 2 * T * 2 * T * 8                      # one (H, T, T + S) float64 array
    assert peaks[1] < 2.5 * peaks[0], peaks


@pytest.mark.parametrize("bad,message", [
    (dict(extra_keys=9), "extra_keys = 9 but k holds only S = 8 keys"),
    (dict(extra_keys=-1), "extra_keys must be an integer >= 0"),
    (dict(extra_keys=3, key_mask=np.ones((1, 8), bool)), r"key_mask must be \(B, S - extra_keys\) = \(1, 5\)"),
    (dict(extra_keys=3, extra_key_mask=np.ones((1, 4), bool)), r"extra_key_mask must be \(B, extra_keys\) = \(1, 3\)"),
    (dict(extra_key_mask=np.ones((1, 3), bool)), "extra_key_mask is given but extra_keys is 0"),
    (dict(rule="t5gemma"), "rule must be one of"),
])
def test_bad_merged_descriptions_are_refused(bad, message):
    q, k = np.zeros((1, 2, 4, 8)), np.zeros((1, 1, 8, 8))
    for fn in (F.attention_forward, D.decode_attention):
        with pytest.raises(ValueError, match=message):
            fn(q, k, k, 0.5, None, **{"causal": True, **bad})
