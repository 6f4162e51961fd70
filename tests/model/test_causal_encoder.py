"""The causal-encoder ablation (GemmaConfig.causal_encoder): the encoder keeps its causal mask.

Oracle, independent of the masks' code: causality itself. Change the input after position t
and the encoder's outputs at positions <= t must not move (up to float64 rounding), on both
backends, with padding, on sliding and full layers. Negative control: the default
(bidirectional) encoder's outputs at <= t do move. The flag travels through config.json (a
field of minencdec's own, written only when set) and into a classifier built on the encoder.
"""

import json

import numpy as np
import pytest

from minencdec.io.pretrained import load_pretrained
from minencdec.model.classify import Classifier
from minencdec.model.config import CAUSAL_ENCODER_FIELD, GemmaConfig, T5GemmaConfig, gemma3_config
from minencdec.model.t5gemma import T5GemmaModel

STACK = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
             max_position_embeddings=64)
T, CUT = 12, 5                    # inputs of 12 tokens; everything after position 5 changes


def pair(causal, family="gemma2"):
    make = gemma3_config if family == "gemma3" else GemmaConfig
    enc = make(**STACK).replace(causal_encoder=causal)
    return T5GemmaConfig(enc, make(**STACK))


def inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 48, (2, T))
    changed = ids.copy()
    changed[:, CUT + 1:] = rng.integers(3, 48, (2, T - CUT - 1))
    assert (changed[:, CUT + 1:] != ids[:, CUT + 1:]).any(axis=1).all()
    mask = np.ones((2, T), dtype=bool)
    mask[1, -2:] = False                                       # row 1 right-padded
    return ids, changed, mask


def moved_before_cut(model):
    ids, changed, mask = inputs()
    a, b = model.encode(ids, mask), model.encode(changed, mask)
    return float(np.abs(a[:, :CUT + 1] - b[:, :CUT + 1]).max()), float(np.abs(a[:, CUT + 1:] - b[:, CUT + 1:]).max())


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_causal_encoder_never_reads_ahead(backend, family):
    model = T5GemmaModel.random(pair(True, family), seed=1, dtype="float64", backend=backend)
    before, after = moved_before_cut(model)
    assert before <= 1e-12, f"a later token changed an earlier encoder output by {before:.2e}"
    assert after > 1e-3                                        # the changed positions themselves did change


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_negative_control_the_default_encoder_reads_ahead(backend, family):
    model = T5GemmaModel.random(pair(False, family), seed=1, dtype="float64", backend=backend)
    before, _ = moved_before_cut(model)
    assert before > 1e-3


def test_the_flag_is_written_only_when_set_and_read_back(tmp_path):
    assert CAUSAL_ENCODER_FIELD not in pair(False).to_hf_dict()
    d = pair(True).to_hf_dict()
    assert d[CAUSAL_ENCODER_FIELD] is True
    assert "causal_encoder" not in d["encoder"] and "causal_encoder" not in d["decoder"]
    back = T5GemmaConfig.from_hf_dict(d)
    assert back.encoder.causal_encoder and not back.decoder.causal_encoder
    assert back == pair(True)
    # through a checkpoint directory, and into a classifier on the encoder (and its checkpoint)
    model = T5GemmaModel.random(pair(True), seed=2)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config.encoder.causal_encoder
    clf = Classifier.from_model(loaded, 3)
    assert clf.config.causal_encoder
    clf.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())[CAUSAL_ENCODER_FIELD] is True
    assert load_pretrained(tmp_path / "c").config.causal_encoder


def test_a_classifier_on_a_causal_encoder_pools_a_causal_stack():
    """The classifier reads the last token, which in a causal encoder has seen the whole
    input: its logits change with a late token (so it is not blind), while the encoder
    outputs before that token do not (so it is causal)."""
    clf = Classifier.from_model(T5GemmaModel.random(pair(True), seed=3, dtype="float64"), 3)
    ids, changed, _ = inputs()
    assert np.abs(clf.logits(ids) - clf.logits(changed)).max() > 1e-6


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_value_is_refused_with_the_field_named(value):
    d = {**pair(False).to_hf_dict(), CAUSAL_ENCODER_FIELD: value}
    if value is None:                                          # null: not set, as transformers writes nothing
        assert not T5GemmaConfig.from_hf_dict(d).encoder.causal_encoder
        return
    with pytest.raises(ValueError, match=f"ck/config.json: {CAUSAL_ENCODER_FIELD} must be true or false"):
        T5GemmaConfig.from_hf_dict(d, "ck/config.json")
    with pytest.raises(ValueError, match="causal_encoder"):
        GemmaConfig(**STACK, causal_encoder=value)
