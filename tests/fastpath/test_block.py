"""The fused attention block (fastpath/block.py) and its heads pass against the reference.

Oracles: minencdec.model.layers' rmsnorm and RoPE (forward and backward) for the heads pass,
and minencdec.model.attention.attention_block_forward/backward for the whole block, on the
same weights: self-attention with RoPE (Gemma 2) and with QK-norm (Gemma 3), T5Gemma's
cross-attention, T5Gemma 2's merged attention (and the case where no query may see the
encoder), GQA, float32 and float64. Negative controls: RoPE applied with the wrong sign,
and merged keys without their k_norm, are caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import attention as R
from minencdec.model import layers as L

from fastpath import block as FB

RTOL = {np.float64: 1e-12, np.float32: 1e-5}   # one pass vs NumPy's several: rounding only


@st.composite
def heads_cases(draw):
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    B, L_, n, extra = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 4)), draw(st.integers(0, 3))
    Dh = 2 * draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c0 = draw(st.integers(0, extra)) * Dh                       # the heads sit after c0 / Dh others in P
    P = (rng.standard_normal((B, L_, (n + extra) * Dh)) * draw(st.floats(0.1, 5.0))).astype(dtype)
    w = rng.normal(0, 0.5, Dh).astype(dtype) if draw(st.booleans()) else None
    rope = None
    if draw(st.booleans()):
        pos = rng.integers(0, 50, (draw(st.sampled_from([1, B])), L_))
        cos, sin = L.rope_cos_sin(pos, Dh, 10000.0, dtype)       # (1 or B, L, Dh)
        rope = (cos[:, None], sin[:, None]) if draw(st.booleans()) else (cos[0], sin[0])   # as models give them
    return dtype, P, c0, n, Dh, w, rope, rng.standard_normal((B, n, L_, Dh)).astype(dtype)


def reference_heads(P, c0, n, Dh, w, rope):
    """The reference's steps on those columns: split, QK-norm, RoPE; and the backward."""
    B, L_, _ = P.shape
    x = P[:, :, c0:c0 + n * Dh].reshape(B, L_, n, Dh).transpose(0, 2, 1, 3)
    norm_c = rope_c = None
    if w is not None:
        x, norm_c = L.rmsnorm_forward(x, w, 1e-6)
    if rope is not None:
        x, rope_c = L.rope_forward(x, *rope)

    def backward(dy):
        if rope_c is not None:
            dy = L.rope_backward(dy, rope_c)
        dw = None
        if norm_c is not None:
            dy, dw = L.rmsnorm_backward(dy, norm_c)
        return dy.transpose(0, 2, 1, 3).reshape(B, L_, n * Dh), dw
    return x, backward


@given(heads_cases())
def test_heads_pass_matches_reference(case):
    dtype, P, c0, n, Dh, w, rope, dout = case
    want, backward = reference_heads(P, c0, n, Dh, w, rope)
    got, rstd = FB.heads(P, c0, n, Dh, w, 1e-6, rope)
    assert_close("heads", got, want, RTOL[dtype])
    dP = np.full_like(P, np.nan)
    dw = FB.heads_backward(dout, 0, P, c0, w, rstd, rope, dP)
    dP_want, dw_want = backward(dout)
    assert_close("dP", dP[:, :, c0:c0 + n * Dh], dP_want, RTOL[dtype] * 10)
    assert np.isnan(dP[:, :, :c0]).all() and np.isnan(dP[:, :, c0 + n * Dh:]).all()   # other columns untouched
    assert (dw is None) == (w is None)
    if w is not None:
        assert_close("dw", dw, dw_want, RTOL[dtype] * 10)


def test_negative_control_rope_turned_the_other_way_fails():
    rng = np.random.default_rng(1)
    P = rng.standard_normal((2, 5, 16))
    cos, sin = L.rope_cos_sin(np.arange(5), 8, 10000.0, np.float64)
    want, _ = reference_heads(P, 0, 2, 8, None, (cos, sin))
    assert_close("heads", FB.heads(P, 0, 2, 8, None, None, (cos, sin))[0], want, 1e-12)
    with pytest.raises(AssertionError):
        assert_close("heads", FB.heads(P, 0, 2, 8, None, None, (cos, -sin))[0], want, 1e-12)

# ---------------------------------------------------------------------------- the block


def _weights(rng, D, Ds, H, K, Dh, qk_norm, dtype):
    w = {"q_proj": rng.normal(0, 0.2, (H * Dh, D)), "k_proj": rng.normal(0, 0.2, (K * Dh, Ds)),
         "v_proj": rng.normal(0, 0.2, (K * Dh, Ds)), "o_proj": rng.normal(0, 0.2, (D, H * Dh))}
    if qk_norm:
        w.update(q_norm=rng.normal(0, 0.3, Dh), k_norm=rng.normal(0, 0.3, Dh))
    return {k: v.astype(dtype) for k, v in w.items()}


def run_block(fn_forward, fn_backward, kind, dtype, seed=0, hide_memory=False):
    """y and every gradient of one block of the given kind, through forward/backward functions
    with the reference's signatures (dsource None: already in dx); fn_backward None: y only."""
    rng = np.random.default_rng(seed)
    B, T, D, H, K, Dh = 2, 37, 12, 4, 2, 8
    x = rng.standard_normal((B, T, D)).astype(dtype)
    key_mask = (np.arange(T)[None] >= np.array([[0], [4]]))
    rope = tuple(L.rope_cos_sin(np.arange(T), Dh, 10000.0, dtype))
    memory = None
    if kind == "cross":
        S = 29
        source = rng.standard_normal((B, S, 10)).astype(dtype)
        w = _weights(rng, D, 10, H, K, Dh, False, dtype)
        mask, rope, cap = R.Mask(causal=False, key_mask=np.arange(S)[None] < [[S], [S - 6]]), None, 5.0
    else:
        source, cap = x, (3.0 if kind == "self" else None)
        w = _weights(rng, D, D, H, K, Dh, kind != "self", dtype)
        mask = R.Mask(causal=True, window=6, key_mask=key_mask)
        if kind == "merged":
            M = 23
            memory = rng.standard_normal((B, M, D)).astype(dtype)
            enc_mask = np.zeros((B, M), bool) if hide_memory else np.arange(M)[None] < [[M], [M - 5]]
            mask = mask._replace(extra_keys=M, extra_key_mask=enc_mask)
    y, cache = fn_forward(x, source, w, mask, H, K, 0.3, cap, rope, None, eps=1e-6, memory=memory)
    if fn_backward is None:
        return (y,)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx, dsource, dmemory, dws = fn_backward(dy, cache)
    if kind != "cross":
        dx = dx if dsource is None else dx + dsource
        dsource = None
    return y, dx, dsource, dmemory, dws


@pytest.mark.parametrize("kind", ["self", "self_qk_norm", "cross", "merged"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_block_matches_reference(kind, dtype):
    ref = run_block(R.attention_block_forward, R.attention_block_backward, kind, dtype)
    fast = run_block(FB.attention_block_forward, FB.attention_block_backward, kind, dtype)
    rtol = 1e-11 if dtype == np.float64 else 2e-5
    for name, got, want in zip(("y", "dx", "dsource", "dmemory"), fast[:4], ref[:4]):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_close(name, got, want, rtol)
    assert sorted(fast[4]) == sorted(ref[4])
    for name in ref[4]:
        assert fast[4][name].flags.c_contiguous, name              # the optimizer's fused update needs it
        assert_close(name, fast[4][name], ref[4][name], rtol)


def test_merged_block_with_every_encoder_key_hidden_is_self_attention():
    """No query may see the encoder: self-attention, with a zero gradient for the memory."""
    ref = run_block(R.attention_block_forward, R.attention_block_backward, "merged", np.float64, hide_memory=True)
    fast = run_block(FB.attention_block_forward, FB.attention_block_backward, "merged", np.float64, hide_memory=True)
    assert np.array_equal(fast[3], np.zeros_like(ref[3])) and np.array_equal(ref[3], fast[3])
    assert_close("y", fast[0], ref[0], 1e-11)


def test_negative_control_merged_keys_without_k_norm_fail(monkeypatch):
    heads = FB.heads

    def memory_unnormed(P, c0, n, Dh, w_norm, eps, rope, out=None, l0=0):
        return heads(P, c0, n, Dh, None if l0 else w_norm, eps, rope, out, l0)   # l0 > 0: the memory's rows
    monkeypatch.setattr(FB, "heads", memory_unnormed)
    ref = run_block(R.attention_block_forward, None, "merged", np.float64)
    fast = run_block(FB.attention_block_forward, None, "merged", np.float64)
    with pytest.raises(AssertionError):
        assert_close("y", fast[0], ref[0], 1e-11)


def test_other_dtypes_and_array_masks_fall_back_to_the_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 12)).astype(np.float16)
    w = _weights(rng, 12, 12, 2, 1, 4, False, np.float16)
    mask = R.Mask(causal=True).dense(5, 5)                       # an array, not a description
    y, cache = FB.attention_block_forward(x, x, w, mask, 2, 1, 0.5, None)
    y_ref, _ = R.attention_block_forward(x, x, w, mask, 2, 1, 0.5, None)
    assert cache[0] == "reference" and np.array_equal(y, y_ref)
    assert len(FB.attention_block_backward(np.ones_like(y), cache)) == 4
