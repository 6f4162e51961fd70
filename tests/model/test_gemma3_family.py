"""Gemma 3 and T5Gemma 2 as whole models, against oracles that do not use their code.

1. Finite differences in float64 on every parameter tensor (QK-norm weights, the shared
   table, eoi_embedding included), the loss of each model with padding, -100 labels, an
   input holding the eoi token, unequal encoder/decoder depths and windows shorter than
   the sequence.
2. Adaptation is a pure copy: with every encoder key masked, the adapted T5Gemma 2 decoder
   gives the Gemma 3 source's logits bit for bit (600 tokens, sliding windows active).
3. Generation with KV caches equals the full forward at every step (both families).
4. Conventions: T5Gemma 2 derives no mask from pad ids (as transformers' T5Gemma 2); batch
   sizes must agree; the encoder classifier's gradients.
The comparisons with transformers itself are in test_oracle_gemma3.py (live and golden) and
test_generate_gemma3.py. Negative controls: a QK-norm gradient that is off, and adaptation
with one norm left out, are caught.
"""

import numpy as np
import pytest

from helpers import RTOL_F64, assert_close, gradcheck
from minencdec.model import generate as G
from minencdec.model.adapt import adapt_params
from minencdec.model.classify import Classifier
from minencdec.model.config import T5GemmaConfig, gemma3_config
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import EOI, T5GemmaModel

EOI_ID = 7
rng = np.random.default_rng(33)


def tiny(**changes):
    """A Gemma 3 stack: MQA-ish GQA, head_dim != D / H, qpas != head_dim, window 3, 5 layers
    (four sliding, one full), a linear RoPE scale on the full layer."""
    base = dict(vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, head_dim=10, query_pre_attn_scalar=7, sliding_window=3,
                max_position_embeddings=64, rope_scaling_factor=2.0)
    return gemma3_config(**{**base, **changes})


def randomize(model, scale=1.0):
    """Random non-zero norm weights (and eoi), so a forgotten `1 +` or wrong dw shows."""
    for name, w in model.params.items():
        if w.ndim == 1:
            w[...] = rng.normal(0, 0.4, w.shape)
        else:
            w *= scale
    return model


def gemma3_lm():
    return randomize(Gemma2Model.random(tiny(), seed=1, dtype="float64"), 8.0)


def t5gemma2(enc_layers=4, dec_layers=2, softcap=None):
    caps = dict(final_logit_softcapping=softcap)      # Gemma 3 has no attention softcap (config.py)
    cfg = T5GemmaConfig(tiny(num_hidden_layers=enc_layers, **caps), tiny(num_hidden_layers=dec_layers, **caps),
                        eoi_token_index=EOI_ID)
    return randomize(T5GemmaModel.random(cfg, seed=2, dtype="float64"), 8.0)


def check_every_gradient(loss_fn, params, grads, samples=6):
    assert set(grads) == set(params)
    for name in sorted(params):
        gradcheck(name, loss_fn, params[name], grads[name], rng, samples=samples)


def test_gemma3_every_gradient_by_finite_differences():
    model = gemma3_lm()
    ids = rng.integers(3, 97, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :3] = 0                                               # left padding
    labels = np.where(mask == 1, ids, -100)
    loss, grads = model.loss_and_grads(ids, labels, mask)
    assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.4.self_attn.k_norm.weight"} <= set(grads)
    check_every_gradient(lambda: model.loss_and_grads(ids, labels, mask)[0], model.params, grads)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_t5gemma2_every_gradient_by_finite_differences(softcap):
    model = t5gemma2(softcap=softcap)
    ids = rng.integers(8, 97, (2, 8))
    ids[0, 2] = EOI_ID                                            # the eoi token: eoi_embedding, not the table
    mask = np.ones_like(ids)
    mask[1, 5:] = 0                                               # right padding of the encoder
    labels = rng.integers(8, 97, (2, 6))
    labels[0, 3] = EOI_ID
    labels[1, 4:] = -100
    loss, grads = model.loss_and_grads(ids, labels, mask)
    assert "model.decoder.embed_tokens.weight" not in grads and EOI in grads
    assert np.abs(grads[EOI]).max() > 0
    check_every_gradient(lambda: model.loss_and_grads(ids, labels, mask)[0], model.params, grads)


def test_negative_control_a_wrong_qk_norm_gradient_is_caught():
    model = t5gemma2()
    ids, labels = rng.integers(8, 97, (1, 6)), rng.integers(8, 97, (1, 5))
    _, grads = model.loss_and_grads(ids, labels)
    name = "model.decoder.layers.1.self_attn.k_norm.weight"
    with pytest.raises(AssertionError, match="gradient of"):
        gradcheck(name, lambda: model.loss_and_grads(ids, labels)[0], model.params[name], grads[name] * 1.001,
                  rng, samples=6)


def adapted(source):
    config, params, mode = adapt_params(source.params, source.config, source.params, source.config)
    assert mode == "merged" and config.family == "t5gemma2"
    return T5GemmaModel(config, params, "float64")


def test_adaptation_masked_encoder_reproduces_gemma3_bit_for_bit():
    source = randomize(Gemma2Model.random(tiny(max_position_embeddings=1024, num_hidden_layers=7), seed=4,
                                          dtype="float64"), 8.0)
    model = adapted(source)
    dec = rng.integers(3, 97, (2, 600))                           # far past the window of 3
    enc = rng.integers(3, 97, (2, 11))
    want = source.logits(dec)
    got = model.logits(enc, dec, attention_mask=np.zeros_like(enc), decoder_attention_mask=np.ones_like(dec))
    assert np.array_equal(got, want), np.abs(got - want).max()
    # ... and with the encoder visible the decoder does read it (the copy is not inert).
    seen = model.logits(enc, dec, attention_mask=np.ones_like(enc), decoder_attention_mask=np.ones_like(dec))
    assert np.abs(seen - want).max() > 1e-3
    # Negative control: an adaptation that drops one layer's pre-norm does not reproduce it.
    broken = dict(model.params)
    broken["model.decoder.layers.3.pre_self_attn_layernorm.weight"] = np.zeros(24)
    bad = T5GemmaModel(model.config, broken, "float64").logits(enc, dec, attention_mask=np.zeros_like(enc),
                                                               decoder_attention_mask=np.ones_like(dec))
    assert not np.array_equal(bad, want)


def test_adaptation_copies_every_tensor_and_builds_eoi():
    source = gemma3_lm()
    model = adapted(source)
    p, s = model.params, source.params
    assert np.array_equal(p["model.encoder.embed_tokens.weight"], s["model.embed_tokens.weight"])
    for i in range(5):
        for side in ("encoder", "decoder"):
            assert np.array_equal(p[f"model.{side}.layers.{i}.pre_self_attn_layernorm.weight"],
                                  s[f"model.layers.{i}.input_layernorm.weight"])
            assert np.array_equal(p[f"model.{side}.layers.{i}.self_attn.k_norm.weight"],
                                  s[f"model.layers.{i}.self_attn.k_norm.weight"])
    # vocab 97 < 256000: no eoi row, so eoi_embedding starts at zero as transformers' does.
    assert not p[EOI].any()
    cfg = T5GemmaConfig(tiny(), tiny(), eoi_token_index=EOI_ID)
    _, params, _ = adapt_params(s, source.config, s, source.config)
    params["model.encoder.embed_tokens.eoi_embedding"] = s["model.embed_tokens.weight"][EOI_ID] * np.sqrt(24)
    both = T5GemmaModel(cfg, params, "float64")
    ids = np.array([[5, EOI_ID, 9]])                              # eoi_embedding == the scaled row: same logits
    no_eoi = T5GemmaModel(T5GemmaConfig(tiny(), tiny(), eoi_token_index=96), params, "float64")
    assert_close("eoi as row", both.logits(ids, ids), no_eoi.logits(ids, ids), RTOL_F64)


def test_adaptation_refuses_mixed_families_and_cross_attention_modes():
    g3 = gemma3_lm()
    g2 = Gemma2Model.random(tiny().replace(family="gemma2", rope_local_base_freq=None, rope_scaling_factor=1.0,
                                           bidirectional_window=None), dtype="float64")
    with pytest.raises(ValueError, match="disagree on family"):
        adapt_params(g3.params, g3.config, g2.params, g2.config)
    with pytest.raises(ValueError, match="merged attention reuses"):
        adapt_params(g3.params, g3.config, g3.params, g3.config, cross_attn="random")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_cached_generation_equals_the_full_forward(backend):
    lm = gemma3_lm()
    lm = Gemma2Model(lm.config, lm.params, "float64", backend)
    ids = rng.integers(8, 97, (2, 7))
    ids[1, :2] = 0                                                # left-padded prompt
    out = lm.generate(ids, max_new_tokens=9, eos_token_id=-1)
    full = lm.logits(out, attention_mask=(out != 0).astype(int))
    state, logits = G.start(lm, ids)
    for t in range(9):
        assert_close(f"gemma3 step {t}", logits, full[:, 6 + t], 1e-10)
        logits = G.step(state, out[:, 7 + t])
    t5 = t5gemma2()
    t5 = T5GemmaModel(t5.config, t5.params, "float64", backend)
    ids = rng.integers(8, 97, (2, 8))
    ids[0, 1], ids[1, 6:] = EOI_ID, 0                             # eoi in the input, a padded row
    out = t5.generate(ids, max_new_tokens=9, eos_token_id=-1)
    full = t5.logits(ids, out, attention_mask=(ids != 0).astype(int), decoder_attention_mask=np.ones_like(out))
    state, logits = G.start(t5, ids)
    for t in range(9):
        assert_close(f"t5gemma2 step {t}", logits, full[:, t], 1e-10)
        logits = G.step(state, out[:, t + 1])


def test_t5gemma2_derives_no_mask_from_pad_ids():
    """As transformers' T5Gemma 2 (and unlike T5Gemma): without attention_mask every token,
    pad or not, is attended to; with it, padded keys are hidden."""
    model = t5gemma2()
    ids = rng.integers(8, 97, (1, 7))
    ids[0, 5:] = 0
    dec = rng.integers(8, 97, (1, 4))
    implicit = model.logits(ids, dec)
    assert_close("no mask = all ones", implicit, model.logits(ids, dec, np.ones_like(ids), np.ones_like(dec)), 0.0)
    masked = model.logits(ids, dec, (ids != 0).astype(int), np.ones_like(dec))
    assert np.abs(masked - implicit).max() > 1e-6                 # the mask does matter


def test_batch_sizes_must_agree():
    model = t5gemma2()
    with pytest.raises(ValueError, match="decoder_input_ids have batch 2 but input_ids have batch 1"):
        model.logits(rng.integers(8, 97, (1, 5)), rng.integers(8, 97, (2, 3)))


def test_encoder_classifier_of_t5gemma2_and_gemma3_gradients():
    for source in (t5gemma2(), gemma3_lm()):
        clf = Classifier.from_model(source, 3, seed=5)
        for name, w in clf.params.items():
            if name.startswith("score"):
                w[...] = rng.normal(0, 1.0, w.shape)
        ids = rng.integers(8, 97, (3, 6))
        ids[0, 2] = EOI_ID
        ids[2, 4:] = 0
        labels = np.array([0, 2, 1])
        _, grads = clf.loss_and_grads(ids, labels)
        if clf.eoi:
            assert EOI in grads
        check_every_gradient(lambda: clf.loss_and_grads(ids, labels)[0], clf.params, grads, samples=4)
