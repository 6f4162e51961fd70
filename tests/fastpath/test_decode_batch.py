"""The decode step's kernels as a batch runs them: padded rows, several lanes, chunked weights.

1. decode_attention against the reference (a dense mask, NumPy softmax) in float64 and
   float32 on batches whose rows are padded as batched generation pads them: real keys in an
   interval with padding before and after it (left-padded prompts, right-padded encoder
   inputs), holes inside, rows with nothing real; own keys and extra keys; split over three
   lanes that take (row, head) items in turn (decode.claim).
2. The few-rows product (decoder.rows_times_weights) across several CHUNK_BYTES chunks, with
   remainders (N % 4, B % 4), on three lanes, against a float64 product within the rounding
   bound of a K-term dot product.
3. The lane count changes no bit of either result: the decoder may choose its lanes by the
   load of the machine (decoder.LaneChoice) because of it.
4. LaneChoice itself: each setting tried, the faster kept, the other retried every
   TRY_EVERY steps, and a change of load followed.
Negative controls: the attention check catches padding read as real keys; the product check
catches a chunk left out; the bitwise check catches a one-ulp difference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import attention as R

from fastpath import decode as D
from fastpath import decoder as FD
from fastpath.masks import dense_mask

# As tests/fastpath/test_fastpath.py (measured there): float64 within 1e-12 of the natural
# scale (the largest |v|), float32 within 1e-4.
RTOL = {np.float64: 1e-12, np.float32: 1e-4}


def padded_mask(rng, B, n, style):
    """(B, n) bool: per row, real keys in [a, b) with some holes inside ("interval"), or none
    at all ("empty"), or every key real ("full")."""
    mask = np.zeros((B, n), bool)
    for r in range(B):
        kind = style if style != "mixed" else rng.choice(["interval", "empty", "full"])
        if kind == "full":
            mask[r] = True
        elif kind == "interval":
            a = rng.integers(0, n)
            b = rng.integers(a + 1, n + 1)
            mask[r, a:b] = rng.random(b - a) > 0.2
            mask[r, a] = mask[r, b - 1] = True                 # the interval's ends are real
    return mask


@st.composite
def padded_batches(draw):
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    B, K, G = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    Dh, T = draw(st.integers(1, 9)), draw(st.integers(1, 2))
    S, E = draw(st.integers(1, 30)), draw(st.sampled_from([0, draw(st.integers(1, 30))]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    key_mask = padded_mask(rng, B, S, draw(st.sampled_from(["interval", "mixed"])))
    extra_mask = padded_mask(rng, B, E, draw(st.sampled_from(["interval", "mixed"]))) if E else None
    causal = draw(st.booleans())
    mag = draw(st.floats(0.1, 6.0))
    return dict(
        dtype=dtype, q=(rng.standard_normal((B, K * G, T, Dh)) * mag).astype(dtype),
        k=(rng.standard_normal((B, K, S + E, Dh)) * mag).astype(dtype),
        v=rng.standard_normal((B, K, S + E, Dh)).astype(dtype),
        scale=draw(st.floats(0.05, 2.0)), cap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))),
        desc=dict(causal=causal, window=draw(st.one_of(st.none(), st.integers(1, 12))) if causal else None,
                  key_mask=key_mask, q_offset=draw(st.integers(0, 8)) if causal else 0, extra_keys=E,
                  extra_key_mask=extra_mask))


def reference_attention(c):
    q, k, v = c["q"], c["k"], c["v"]
    mask = dense_mask(q.shape[2], k.shape[2], **{**c["desc"], "rule": "le"})
    return R.attention_forward(q, k, v, mask, c["scale"], c["cap"])[0]


@pytest.fixture
def three_lanes(monkeypatch):
    """Every call split over three lanes, whatever its size."""
    monkeypatch.setattr(D, "PARALLEL_WORK", 0)
    monkeypatch.setattr(D, "lanes", lambda n: 3)
    monkeypatch.setattr(FD, "lanes", lambda n: 3)


@given(padded_batches())
def test_decode_attention_on_padded_rows_against_reference(c):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "PARALLEL_WORK", 0)
        mp.setattr(D, "lanes", lambda n: 3)
        got = D.decode_attention(c["q"], c["k"], c["v"], c["scale"], c["cap"], **c["desc"])
    tol = RTOL[c["dtype"]]
    assert got.dtype == c["dtype"]
    assert_close("decode o", got, reference_attention(c), tol, atol=tol * np.abs(c["v"]).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_negative_control_padding_read_as_real_keys_is_caught(dtype, three_lanes):
    rng = np.random.default_rng(4)
    B, H, S, Dh = 3, 2, 20, 8
    c = dict(dtype=dtype, q=rng.standard_normal((B, H, 1, Dh)).astype(dtype),
             k=rng.standard_normal((B, H, S, Dh)).astype(dtype), v=rng.standard_normal((B, H, S, Dh)).astype(dtype),
             scale=0.5, cap=None, desc=dict(causal=False, key_mask=padded_mask(rng, B, S, "interval")))
    want = reference_attention(c)
    unmasked = D.decode_attention(c["q"], c["k"], c["v"], c["scale"], None)        # the padding taken for keys
    with pytest.raises(AssertionError):
        assert_close("decode o", unmasked, want, RTOL[dtype], atol=RTOL[dtype] * np.abs(c["v"]).max())


# ---------------------------------------------------------------------------- the few-rows product


def assert_dots_close(out, x, W, want=None):
    """|out - x W^T| <= K eps sum_k |x_k W_k| entry by entry (the rounding bound of a K-term
    dot product in out's dtype, eps = 2u for margin); a bound relative to the result would
    not do, as a dot of random numbers can cancel to near 0."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    want = x64 @ W64.T if want is None else want
    bound = x.shape[1] * np.finfo(out.dtype).eps * (np.abs(x64) @ np.abs(W64).T)
    err = np.abs(out.astype(np.float64) - want)
    assert np.all(err <= bound), f"x W^T: worst error {np.max(err - bound):.3e} past the rounding bound"


def chunk_rows(K, dtype):
    return FD.CHUNK_BYTES // (K * np.dtype(dtype).itemsize) // 4 * 4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("B", [2, 5, 8])
def test_rows_times_weights_across_chunks_and_lanes(dtype, B, three_lanes):
    """N spans three chunks and a part, plus 3 rows (N % 4); B = 5 leaves a row past the
    blocks of four."""
    K = 64
    N = 3 * chunk_rows(K, dtype) + 40 + 3
    rng = np.random.default_rng(B)
    x, W = rng.standard_normal((B, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    out = np.full((B, N), np.nan, dtype)
    FD.rows_times_weights(x, W, out)
    assert_dots_close(out, x, W)


def test_negative_control_a_chunk_left_out_is_caught(three_lanes):
    K, dtype = 64, np.float32
    n = chunk_rows(K, dtype)
    rng = np.random.default_rng(0)
    x, W = rng.standard_normal((8, K)).astype(dtype), rng.standard_normal((3 * n, K)).astype(dtype)
    out = np.empty((8, 3 * n), dtype)
    FD.rows_times_weights(x, W, out)
    skipped = x.astype(np.float64) @ W.T.astype(np.float64)
    skipped[:, n:2 * n] = 0.0                                     # the second chunk never computed
    with pytest.raises(AssertionError):
        assert_dots_close(out, x, W, skipped)


# ---------------------------------------------------------------------------- lanes change no bit


def product_on(n_lanes, x, W, monkeypatch):
    monkeypatch.setattr(FD, "lanes", lambda n: n_lanes)
    out = np.empty((x.shape[0], W.shape[0]), x.dtype)
    FD.rows_times_weights(x, W, out)
    return out


def attention_on(n_lanes, c, monkeypatch):
    monkeypatch.setattr(D, "PARALLEL_WORK", 0)
    monkeypatch.setattr(D, "lanes", lambda n: n_lanes)
    return D.decode_attention(c["q"], c["k"], c["v"], c["scale"], c["cap"], **c["desc"])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lanes_change_no_bit(dtype, monkeypatch):
    rng = np.random.default_rng(7)
    K = 96
    x = rng.standard_normal((7, K)).astype(dtype)
    W = rng.standard_normal((2 * chunk_rows(K, dtype) + 9, K)).astype(dtype)
    one, three = product_on(1, x, W, monkeypatch), product_on(3, x, W, monkeypatch)
    np.testing.assert_array_equal(one, three)
    B, H, S, Dh = 4, 3, 40, 16
    c = dict(q=rng.standard_normal((B, H, 1, Dh)).astype(dtype), k=rng.standard_normal((B, H, S, Dh)).astype(dtype),
             v=rng.standard_normal((B, H, S, Dh)).astype(dtype), scale=0.25, cap=20.0,
             desc=dict(causal=True, window=9, key_mask=padded_mask(rng, B, S, "mixed"), q_offset=S - 1))
    np.testing.assert_array_equal(attention_on(1, c, monkeypatch), attention_on(3, c, monkeypatch))
    # negative control: the same check sees one ulp
    three[2, 5] = np.nextafter(three[2, 5], np.inf)
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(one, three)


# ---------------------------------------------------------------------------- choosing the lanes


def test_lane_choice_tries_both_keeps_the_faster_and_follows_the_load():
    choice = FD.LaneChoice(2)
    every = FD.LaneChoice.TRY_EVERY
    step_seconds = {2: 0.010, 1: 0.014}                           # an idle machine: two lanes faster

    def run(n_steps):
        picks = []
        for _ in range(n_steps):
            n = choice.pick()
            picks.append(n)
            choice.record(n, step_seconds[n])
        return picks

    picks = run(3 * every)
    assert picks[:2] == [2, 1]                                    # each setting timed once first
    later = picks[2:]
    tries = [i for i, n in enumerate(later, start=3) if n == 1]
    assert tries == [s for s in range(3, 3 * every + 1) if s % every == 0]   # the slower, every TRY_EVERY steps
    step_seconds = {2: 0.030, 1: 0.012}                           # another job takes the second core
    picks = run(4 * every)
    assert picks[-every:].count(1) == every - 1                   # it follows: one lane, two tried now and then
    assert FD.LaneChoice(1).options == (1,)                       # one core: nothing to choose
