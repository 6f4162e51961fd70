"""Gemma 3 and T5Gemma 2 models of minencdec against transformers (Gemma3ForCausalLM,
T5Gemma2ForConditionalGeneration; eager, float64 made exact by hf_oracle.float64_exact):

1. float64: logits, loss and every gradient within RTOL_F64, from the golden files (no torch
   needed) and live; the fast path (backend="numba") equal to the reference.
2. float32: our float32 logits against transformers' own float32 model.
3. Checkpoints minencdec writes load in transformers and give the same logits.
Negative controls show the comparison fails on a subtly wrong model; a known difference
(attention softcapping, which transformers' Gemma 3 never applies) is an xfail.
"""

import numpy as np
import pytest

import cases
from helpers import RTOL_F32, RTOL_F64, assert_close
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel

STEMS = list(cases.GOLDEN_GEMMA3)


def build(kind, config, params, dtype="float64", backend="numpy"):
    cls = T5GemmaModel if kind == "t5gemma2" else Gemma2Model
    return cls(config, params, dtype, backend)


def logits_of(kind, model, x, **masks):
    """Our logits on a case's inputs, called as the oracle is: T5Gemma 2 with the encoder mask
    and no decoder mask unless `masks` say otherwise."""
    if kind == "t5gemma2":
        kw = {"attention_mask": x["attention_mask"], **masks}
        return model.logits(x["input_ids"], x["decoder_input_ids"], **kw)
    return model.logits(x["input_ids"], x["attention_mask"])


def run_ours(kind, model, x):
    loss, grads = model.loss_and_grads(x["input_ids"], x["labels"], x["attention_mask"])
    out = {"logits": logits_of(kind, model, x), "loss": loss, "grads": grads}
    if kind == "t5gemma2":
        out["encoder_out"] = model.encode(x["input_ids"], x["attention_mask"])
    return out


def comparable(kind, x):
    """Gemma 3: non-pad positions (a left-padded causal query sees no key). T5Gemma 2 without
    a decoder mask: every position (its pad ids are ordinary causal tokens, in both)."""
    if kind == "t5gemma2":
        return np.ones(x["labels"].shape, dtype=bool)
    return cases.valid_positions(x["attention_mask"])


def compare(kind, ours, want, x, rtol=RTOL_F64):
    rows = comparable(kind, x)
    assert_close("logits", ours["logits"][rows], want["logits"][rows], rtol)
    if "encoder_out" in want:
        enc = cases.valid_positions(x["attention_mask"])
        assert_close("encoder_out", ours["encoder_out"][enc], want["encoder_out"][enc], rtol)
    assert_close("loss", ours["loss"], want["loss"], rtol)
    assert set(ours["grads"]) == set(want["grads"]), "gradient names differ"
    for name in want["grads"]:
        assert_close(f"grad {name}", ours["grads"][name], want["grads"][name], rtol)


def oracle(stem, source):
    """(kind, config, params, inputs, outputs) from a golden file or a live transformers run."""
    kind, config, params, x, opts = cases.golden_case(stem)
    if source == "golden":
        params, x, outputs = cases.load_golden(stem)
        return kind, config, params, x, outputs
    pytest.importorskip("torch")
    import oracle_hf
    return kind, config, params, x, oracle_hf.run_golden(kind, config, params, x, opts)


# --------------------------------------------------------------------------- float64

@pytest.mark.parametrize("source", ["golden", "live"])
@pytest.mark.parametrize("stem", STEMS)
def test_matches_transformers_float64(stem, source):
    kind, config, params, x, want = oracle(stem, source)
    compare(kind, run_ours(kind, build(kind, config, params), x), want, x)


@pytest.mark.parametrize("stem", STEMS)
def test_numba_backend_matches_reference(stem):
    """The fast path in float64 == the reference (it may fall back to it for merged attention)."""
    kind, config, params, x, _ = cases.golden_case(stem)
    ref = run_ours(kind, build(kind, config, params), x)
    compare(kind, run_ours(kind, build(kind, config, params, backend="numba"), x), ref, x)


def test_t5gemma2_masks_as_given():
    """With an explicit decoder mask (pad keys hidden) and with no encoder mask at all
    (every token attended to, as transformers' T5Gemma 2 does), our logits == the oracle's."""
    pytest.importorskip("torch")
    import oracle_hf
    kind, config, params, x, _ = cases.golden_case("t5gemma2_unequal_depth")
    model = build(kind, config, params)
    dec_mask = x["decoder_attention_mask"]
    want = oracle_hf.t5gemma2_run(config, params, x["input_ids"], None, x["attention_mask"],
                                  x["decoder_input_ids"], dec_mask)["logits"]
    rows = cases.valid_positions(dec_mask)
    got = logits_of(kind, model, x, decoder_attention_mask=dec_mask)
    assert_close("decoder mask given", got[rows], want[rows], RTOL_F64)
    want = oracle_hf.t5gemma2_run(config, params, x["input_ids"], None, None, x["decoder_input_ids"])["logits"]
    assert_close("no masks", logits_of(kind, model, x, attention_mask=None), want, RTOL_F64)


# --------------------------------------------------------------------------- negative controls

@pytest.mark.parametrize("stem,name", [
    ("gemma3_gqa_mixed", "model.layers.1.self_attn.q_norm.weight"),
    ("t5gemma2_unequal_depth", "model.decoder.layers.0.self_attn.k_norm.weight"),
    ("t5gemma2_global_cap", "model.encoder.embed_tokens.eoi_embedding"),
])
def test_comparison_catches_a_tiny_error(stem, name):
    """One QK-norm weight (or the eoi vector) moved by 1e-7 must fail the comparison."""
    kind, config, params, x, want = oracle(stem, "golden")
    params = dict(params)
    params[name] = params[name] + 1e-7
    with pytest.raises(AssertionError):
        compare(kind, run_ours(kind, build(kind, config, params), x), want, x)


def test_comparison_catches_the_t5gemma_window_rule():
    """T5Gemma's encoder window (|i - j| <= w) instead of T5Gemma 2's (w keys, one more to the
    right when w is even) must fail: the encoder's window 4 < S = 8 is on two layers."""
    from minencdec.model.config import T5GemmaConfig
    kind, config, params, x, want = oracle("t5gemma2_unequal_depth", "golden")
    for rule in ("le", "lt"):
        wrong = T5GemmaConfig(config.encoder.replace(bidirectional_window=rule), config.decoder,
                              eoi_token_index=config.eoi_token_index)
        with pytest.raises(AssertionError):
            compare(kind, run_ours(kind, build(kind, wrong, params), x), want, x)



# transformers' Gemma3Attention, T5Gemma2SelfAttention and T5Gemma2MergedAttention never pass
# attn_logit_softcapping to eager_attention_forward: a config that sets it runs uncapped.
# minencdec refuses such a config rather than ignore a field (model/config.py). This test
# holds the evidence: transformers' logits with a cap equal its logits without one, and
# our config refuses the cap. If transformers starts applying it, the first assert fails.

def test_attention_softcap_is_refused_because_transformers_ignores_it():
    from minencdec.model.config import T5GemmaConfig
    kind, config, params, x, opts = cases.golden_case("gemma3_gqa_mixed")
    with pytest.raises(ValueError, match="never apply it"):
        config.replace(attn_logit_softcapping=1.0)
    with pytest.raises(ValueError, match="never apply it"):
        T5GemmaConfig(config.replace(attn_logit_softcapping=1.0), config)
    torch = pytest.importorskip("torch")
    import transformers
    hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    logits = []
    for cap in (None, 1.0):
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**hf, "attn_logit_softcapping": cap}))
        model = model.to(torch.float64).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=False)
        with torch.no_grad():
            logits.append(model(torch.from_numpy(x["input_ids"])).logits.numpy())
    assert np.array_equal(logits[0], logits[1]), "transformers now applies the attention softcap: revisit config.py"


# --------------------------------------------------------------------------- float32

@pytest.mark.parametrize("stem", STEMS)
def test_float32_matches_transformers_float32(stem):
    """Our float32 model against transformers' unpatched float32 model (logits)."""
    pytest.importorskip("torch")
    import oracle_hf
    kind, config, params, x, _ = cases.golden_case(stem)
    model = build(kind, config, params, "float32")
    ours = logits_of(kind, model, x)
    if kind == "t5gemma2":
        want = oracle_hf.t5gemma2_run(config, params, x["input_ids"], None, x["attention_mask"],
                                      x["decoder_input_ids"], dtype="float32", exact=False)
    else:
        want = oracle_hf.gemma3_run(config, params, x["input_ids"], None, x["attention_mask"],
                                    dtype="float32", exact=False)
    assert ours.dtype == np.float32
    rows = comparable(kind, x)
    assert_close("float32 logits", ours[rows], want["logits"][rows], RTOL_F32)


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("stem", ["gemma3_gqa_mixed", "t5gemma2_unequal_depth"])
def test_saved_checkpoint_loads_in_transformers(stem, tmp_path):
    """`save_pretrained` writes a directory transformers' from_pretrained loads (T5Gemma 2
    builds its own unused vision tower: only those tensors are missing); every text tensor
    arrives unchanged and the logits are ours."""
    torch = pytest.importorskip("torch")
    import transformers
    from minencdec.verify.hf_oracle import float64_exact
    kind, config, params, x, _ = cases.golden_case(stem)
    model = build(kind, config, params)
    model.save_pretrained(tmp_path / "ckpt")
    cls = getattr(transformers, model.hf_config()["architectures"][0])
    assert cls.__name__ == ("T5Gemma2ForConditionalGeneration" if kind == "t5gemma2" else "Gemma3ForCausalLM")
    theirs, info = cls.from_pretrained(tmp_path / "ckpt", attn_implementation="eager", dtype=torch.float64,
                                       output_loading_info=True)
    theirs.eval()
    assert not info["unexpected_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert all(".vision_tower." in k or ".multi_modal_projector." in k for k in info["missing_keys"])
    state = {k.replace("model.encoder.text_model.", "model.encoder."): v for k, v in theirs.state_dict().items()}
    for name, value in params.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with float64_exact(), torch.no_grad():
        if kind == "t5gemma2":
            want = theirs(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                          decoder_input_ids=t["decoder_input_ids"], use_cache=False).logits.numpy()
        else:
            want = theirs(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False).logits.numpy()
    rows = comparable(kind, x)
    assert_close("logits via transformers", logits_of(kind, model, x)[rows], want[rows], RTOL_F64)
