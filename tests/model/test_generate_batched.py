"""Batched generation on the fast path: what runs where, and what the lanes may not change.

1. After T5Gemma's encoder, the fast path makes bos the decoder's first step
   (fastpath/decoder.py) instead of running the reference's stack_step on B rows of one
   token (some 60 calls a layer; at batch 8 its B-row BLAS products each waited for
   OpenBLAS's sleeping threads on a loaded machine: 1.1 s for the bos step alone). The first
   logits come from the decoder's LM head too, for both families. The oracle for the numbers
   is the reference backend; the reference's own functions are made to raise, so a fast
   path that still called them fails.
2. The decoder's lane setting (decoder.LaneChoice picks it by the load) changes no bit of
   any step's logits, on padded batches of both families.
Negative control: the logits check fails for a decoder that ignores the encoder's padding.
"""

from __future__ import annotations

import numpy as np
import pytest

import cases
import test_generate as TG
from helpers import RTOL_F64, assert_close
from minencdec.model import backend
from minencdec.model import generate as G

from fastpath import decoder as FD


def fast(model):
    return type(model)(model.config, model.params, model.dtype, "numba")


def first_logits_and_steps(model, case, n=6):
    ids, mask = TG.gen_inputs(case)
    fed = np.random.default_rng(3).integers(cases.FIRST_ID, 40, (len(ids), n))
    state, logits = G.start(model, ids, mask, n)
    return np.stack([logits] + [G.step(state, fed[:, i]) for i in range(n)]), state


def refuse(name):
    def raiser(*args, **kwargs):
        raise AssertionError(f"the fast path called the reference's {name}")
    return raiser


@pytest.mark.parametrize("case", ["balanced", "unbalanced", "mqa_caps"])
def test_t5gemma_bos_is_the_fast_decoders_first_step(case, monkeypatch):
    ref = TG.build(case)
    want, _ = first_logits_and_steps(ref, case)
    monkeypatch.setattr(G, "stack_step", refuse("stack_step"))         # the encoder does not use it
    monkeypatch.setattr(G, "lm_head_forward", refuse("lm_head_forward"))
    got, state = first_logits_and_steps(fast(ref), case)
    assert state.fast.n == 1 + 6                                       # bos and the six fed tokens
    assert_close(f"{case} logits", got, want, RTOL_F64)


@pytest.mark.parametrize("case", ["gqa_odd", "mixed_types"])
def test_decoder_only_first_logits_from_the_fast_lm_head(case, monkeypatch):
    ref = TG.build(case)
    want, _ = first_logits_and_steps(ref, case)
    monkeypatch.setattr(G, "lm_head_forward", refuse("lm_head_forward"))
    got, _ = first_logits_and_steps(fast(ref), case)
    assert_close(f"{case} logits", got, want, RTOL_F64)


def test_negative_control_decoder_blind_to_encoder_padding_fails(monkeypatch):
    """Row 1 of the case's input is padded: a decoder that sees every encoder key as real
    must be caught by the same comparison."""
    ref = TG.build("balanced")
    want, _ = first_logits_and_steps(ref, "balanced")
    make = backend.kernels("numba").decoder

    def blind(*args):
        args = list(args)
        args[9] = np.ones_like(args[9])                               # cross_valid: every key real
        return make(*args)
    monkeypatch.setattr(backend, "_numba", backend.kernels("numba").__class__(
        **{**backend.kernels("numba").__dict__, "decoder": blind}))
    got, _ = first_logits_and_steps(fast(ref), "balanced")
    with pytest.raises(AssertionError):
        assert_close("logits", got, want, RTOL_F64)


@pytest.mark.parametrize("case", ["gqa_odd", "balanced", "mqa_caps"])
def test_lane_setting_changes_no_bit(case, monkeypatch):
    """Every product and attention split over three lanes, against one lane."""
    model = fast(TG.build(case))
    monkeypatch.setattr(FD, "PARALLEL_ATTENTION", 0)
    monkeypatch.setattr(FD, "lanes", lambda n: 3)
    seen = {}
    for most in (1, 3):
        monkeypatch.setattr(FD.LaneChoice, "pick", lambda self, most=most: most)
        seen[most], state = first_logits_and_steps(model, case)
        assert state.fast.most == most
    np.testing.assert_array_equal(seen[1], seen[3])
