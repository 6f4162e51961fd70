"""Generation on the fast path (backend="numba": fastpath/decoder.py's step, with its
preallocated cache) against independent oracles, batches included.

1. Greedy tokens equal transformers' `generate`, through the golden files its runs wrote
   (tests/model/test_generate.py and test_generate_gemma3.py: every family, left-padded
   batches, windows 1-4, eos and min_new_tokens), and live when torch is installed.
2. Every step's logits equal the reference's (backend="numpy"), for every case and Gemma 3
   / T5Gemma 2, with padding, past the windows, and after the cache has grown; in float32
   too (the decoder's kernels compile apart per dtype).
3. A batch gives each prompt the tokens it gets alone (its padding removed).
4. The few-rows product against NumPy, on one lane and split over several.
Negative controls: a fast decoder that forgets the sliding window is caught; a few-rows
product that skipped the tail rows (N % 4) would be caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import cases
import test_generate as TG
import test_generate_gemma3 as TG3
from helpers import RTOL_F32, RTOL_F64, assert_close
from minencdec.model import backend
from minencdec.model import generate as G

from fastpath import decoder as FD


def fast(model):
    """The same model on the fast path."""
    return type(model)(model.config, model.params, model.dtype, "numba")


@pytest.mark.parametrize("name", TG.RUNS)
def test_fast_greedy_equals_transformers_golden(name):
    run = TG.golden()[name]
    model = fast(TG.build(run["case"]))
    got = G.generate(model, np.array(run["input_ids"]), run["max_new_tokens"], np.array(run["attention_mask"]),
                     eos_token_id=run["eos_token_id"], min_new_tokens=run["min_new_tokens"])
    assert got.tolist() == run["tokens"], f"{name}:\n{got}\nwant\n{np.array(run['tokens'])}"


def test_fast_gemma3_family_equals_transformers_golden():
    lm, t5 = TG3.models()
    assert TG3.ours(fast(lm), fast(t5)) == TG3.golden()


def test_fast_gemma3_family_equals_transformers_live():
    pytest.importorskip("torch")
    lm, t5 = TG3.models()
    assert TG3.ours(fast(lm), fast(t5)) == TG3.transformers_tokens(lm, t5)


def all_models():
    out = {case: TG.build(case) for case in TG.CASES}
    out["gemma3"], out["t5gemma2"] = TG3.models()
    return out


def inputs(name, model):
    if name in TG.CASES:
        return TG.gen_inputs(name)
    ids = TG3.prompts()[0 if name == "gemma3" else 1]
    return ids, (ids != 0).astype(np.int64)


def step_logits(model, ids, mask, n, room=None, seed=3):
    """The logits of the prompt and of n fed tokens (random, the same for every model)."""
    fed = np.random.default_rng(seed).integers(cases.FIRST_ID, 48, (len(ids), n))
    state, logits = G.start(model, ids, mask, room)
    seen = [logits]
    for i in range(n):
        seen.append(G.step(state, fed[:, i]))
    return np.stack(seen), state


@pytest.mark.parametrize("name", list(TG.CASES) + ["gemma3", "t5gemma2"])
def test_fast_steps_equal_reference(name):
    ref = all_models()[name]
    ids, mask = inputs(name, ref)
    want, _ = step_logits(ref, ids, mask, 14)
    got, state = step_logits(fast(ref), ids, mask, 14)
    assert isinstance(state.fast, FD.Decoder)                    # the fast step ran, not the reference's
    assert_close(f"{name} step logits", got, want, RTOL_F64)


@pytest.mark.parametrize("name", ["gqa_odd", "mixed_types", "t5gemma2"])
def test_fast_steps_equal_reference_in_float32(name):
    """The float32 fast step against the float32 reference (the same weights, rounded once)."""
    ref = all_models()[name]
    ref32 = type(ref)(ref.config, {k: v.astype(np.float32) for k, v in ref.params.items()}, "float32")
    ids, mask = inputs(name, ref)
    want, _ = step_logits(ref32, ids, mask, 8)
    got, state = step_logits(fast(ref32), ids, mask, 8)
    assert isinstance(state.fast, FD.Decoder) and got.dtype == np.float32
    assert_close(f"{name} float32 step logits", got, want, RTOL_F32)


@pytest.mark.parametrize("name", ["gqa_odd", "unbalanced", "t5gemma2"])
def test_cache_grows_past_its_room(name):
    """Room for 1 step, then 20: the cache doubles (merged encoder keys move with it)."""
    ref = all_models()[name]
    ids, mask = inputs(name, ref)
    want, _ = step_logits(ref, ids, mask, 20)
    got, state = step_logits(fast(ref), ids, mask, 20, room=1)
    assert state.fast.capacity >= state.fast.n > ids.shape[1]
    assert_close(f"{name} step logits", got, want, RTOL_F64)


@pytest.mark.parametrize("name", ["gqa_odd", "mixed_types", "balanced", "t5gemma2"])
def test_batch_gives_each_prompt_its_tokens_alone(name):
    model = fast(all_models()[name])
    ids, mask = inputs(name, model)
    batch = G.generate(model, ids, 10, mask, eos_token_id=-1)
    for r in range(len(ids)):
        alone_ids = ids[r][mask[r] == 1][None]
        alone = G.generate(model, alone_ids, 10, np.ones_like(alone_ids), eos_token_id=-1)
        assert batch[r, -10:].tolist() == alone[0, -10:].tolist(), (name, r)


def assert_dots_close(out, x, W, want=None):
    """out = x W^T up to the rounding of a K-term dot product in out's dtype, entry by entry:
    |out - want| <= K eps sum_k |x_k W_k| (the textbook bound, with eps = 2u for margin). A
    tolerance relative to the result would not do: a dot of random numbers can cancel to
    near 0 (hypothesis found -0.0045 from 23 terms of size 1, off by 3e-5 relative in float32)."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    want = x64 @ W64.T if want is None else want
    bound = x.shape[1] * np.finfo(out.dtype).eps * (np.abs(x64) @ np.abs(W64).T)
    err = np.abs(out.astype(np.float64) - want)
    assert np.all(err <= bound), f"x W^T: worst error {np.max(err - bound):.3e} past the rounding bound"


@given(st.integers(1, 9), st.integers(1, 40), st.integers(1, 30), st.integers(0, 2**32 - 1),
       st.sampled_from([np.float32, np.float64]))
def test_rows_times_weights_against_numpy(M, N, K, seed, dtype):
    rng = np.random.default_rng(seed)
    x, W = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
    out = np.full((M, N), np.nan, dtype)
    FD.rows_times_weights(x, W, out)
    assert_dots_close(out, x, W)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_times_weights_split_over_lanes(dtype, monkeypatch):
    """Three lanes, shares that are not multiples of 4 (N = 4 * 9 + 3): every row once."""
    monkeypatch.setattr(FD, "lanes", lambda n: 3)
    rng = np.random.default_rng(1)
    x, W = rng.standard_normal((5, 17)).astype(dtype), rng.standard_normal((39, 17)).astype(dtype)
    out = np.full((5, 39), np.nan, dtype)
    FD.rows_times_weights(x, W, out)
    assert_dots_close(out, x, W)
    # negative control: the same check catches a product whose tail rows were left out
    skipped = x.astype(np.float64) @ W.T.astype(np.float64)
    skipped[:, 36:] = 0.0
    with pytest.raises(AssertionError):
        assert_dots_close(out, x, W, skipped)


def test_negative_control_decoder_without_window_fails(monkeypatch):
    make = backend.kernels("numba").decoder

    def windowless(layers, *args):
        return make([{**d, "window": None} for d in layers], *args)
    monkeypatch.setattr(backend, "_numba", backend.kernels("numba").__class__(
        **{**backend.kernels("numba").__dict__, "decoder": windowless}))
    ref = all_models()["gqa_odd"]
    ids, mask = inputs("gqa_odd", ref)
    want, _ = step_logits(ref, ids, mask, 14)
    got, _ = step_logits(fast(ref), ids, mask, 14)
    with pytest.raises(AssertionError):
        assert_close("step logits", got, want, RTOL_F64)
