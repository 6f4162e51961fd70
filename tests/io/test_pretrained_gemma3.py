"""Gemma 3 and T5Gemma 2 directories in and out of minencdec.

1. A directory minencdec writes loads back to the same tensors and logits (both families,
   and the T5Gemma 2 encoder classifier, whose model_type transformers refuses).
2. A T5Gemma 2 directory written by transformers itself (vision tower and all, saved by
   `save_pretrained`) loads: the text tensors equal transformers' own, the vision tensors
   are named once in a warning and left out, and the logits agree with transformers'.
3. `adapt_checkpoints` on a Gemma 3 directory writes a T5Gemma 2 directory whose tensors
   equal their sources bit for bit, and which transformers loads.
Negative control: a directory whose shared table is missing is refused by name.
"""

import json
import warnings

import numpy as np
import pytest

from helpers import assert_close
from minencdec.files.checkpoint import CheckpointError
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.model.classify import Classifier
from minencdec.model.config import T5GemmaConfig, gemma3_config
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel

rng = np.random.default_rng(8)


def tiny(**changes):
    return gemma3_config(**{**dict(vocab_size=120, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, sliding_window=3,
                                   max_position_embeddings=64), **changes})


def randomized(model):
    for w in model.params.values():
        if w.ndim == 1:
            w[...] = rng.normal(0, 0.3, w.shape)
    return model


def test_gemma3_and_t5gemma2_round_trip(tmp_path):
    lm = randomized(Gemma2Model.random(tiny(), seed=1, dtype="float64"))
    lm.save_pretrained(tmp_path / "g3")
    assert json.loads((tmp_path / "g3" / "config.json").read_text())["model_type"] == "gemma3_text"
    back = load_pretrained(tmp_path / "g3", "float64")
    assert back.config == lm.config and all(np.array_equal(back.params[k], lm.params[k]) for k in lm.params)
    t5 = randomized(T5GemmaModel.random(T5GemmaConfig(tiny(), tiny(num_hidden_layers=2), eoi_token_index=9),
                                        seed=2, dtype="float64"))
    t5.save_pretrained(tmp_path / "t5")
    back = load_pretrained(tmp_path / "t5", "float64", expect="t5gemma")
    assert back.config == t5.config and back.config.family == "t5gemma2"
    ids, dec = rng.integers(3, 120, (2, 6)), rng.integers(3, 120, (2, 4))
    assert np.array_equal(back.logits(ids, dec), t5.logits(ids, dec))
    clf = Classifier.from_model(t5, 3)
    clf.save_pretrained(tmp_path / "clf")
    loaded = load_pretrained(tmp_path / "clf", "float64")
    assert isinstance(loaded, Classifier) and loaded.eoi == (9, "model.encoder.embed_tokens.eoi_embedding")
    assert np.array_equal(loaded.logits(ids), clf.logits(ids))
    with pytest.raises(CheckpointError, match="decoder-only"):
        load_pretrained(tmp_path / "t5", expect="gemma2")


def test_a_missing_shared_table_is_named(tmp_path):
    t5 = T5GemmaModel.random(T5GemmaConfig(tiny(), tiny(), eoi_token_index=9), dtype="float64")
    params = {k: v for k, v in t5.params.items() if k != "model.encoder.embed_tokens.weight"}
    from minencdec.files.checkpoint import save_tensors
    save_tensors(tmp_path / "bad", params, t5.hf_config())
    with pytest.raises(CheckpointError, match="missing: model.encoder.embed_tokens.weight"):
        load_pretrained(tmp_path / "bad")


def test_a_t5gemma2_directory_written_by_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers
    config = T5GemmaConfig(tiny(), tiny(num_hidden_layers=2), eoi_token_index=9)
    torch.manual_seed(0)
    hf = transformers.T5Gemma2ForConditionalGeneration(transformers.T5Gemma2Config(**config.to_hf_dict()))
    hf = hf.to(torch.float64).eval()
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_pretrained(tmp_path / "hf", "float64")
    said = [str(w.message) for w in caught if "text-only" in str(w.message)]
    assert len(said) == 1 and "model.encoder.vision_tower.*" in said[0]
    state = hf.state_dict()
    assert np.array_equal(ours.params["model.encoder.layers.1.self_attn.k_norm.weight"],
                          state["model.encoder.text_model.layers.1.self_attn.k_norm.weight"].numpy())
    ids, dec = rng.integers(10, 120, (2, 7)), rng.integers(10, 120, (2, 5))
    ids[0, 2] = 9
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  decoder_input_ids=torch.from_numpy(dec)).logits.numpy()
    # transformers computes its norms, softmax and RoPE in float32 even here (hf_oracle.py): 1e-6.
    assert_close("logits", ours.logits(ids, dec, mask, np.ones_like(dec)), want, 1e-6)


def test_adapting_a_gemma3_directory(tmp_path):
    lm = randomized(Gemma2Model.random(tiny(), seed=3, dtype="float64"))
    lm.save_pretrained(tmp_path / "g3")
    config, mode = adapt_checkpoints(tmp_path / "g3", tmp_path / "g3", tmp_path / "t5")
    assert mode == "merged" and config.family == "t5gemma2"
    t5 = load_pretrained(tmp_path / "t5", "float64")
    assert t5.params["model.encoder.layers.2.self_attn.q_proj.weight"].dtype == np.float64
    for i in range(3):
        assert np.array_equal(t5.params[f"model.decoder.layers.{i}.post_self_attn_layernorm.weight"],
                              lm.params[f"model.layers.{i}.post_attention_layernorm.weight"])
    dec = rng.integers(3, 120, (1, 30))
    assert np.array_equal(t5.logits(dec[:, :4], dec, np.zeros((1, 4), int), np.ones_like(dec)), lm.logits(dec))
    torch = pytest.importorskip("torch")
    import transformers
    hf = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(tmp_path / "t5", dtype=torch.float64)
    assert torch.equal(hf.model.encoder.text_model.embed_tokens.weight,
                       torch.from_numpy(lm.params["model.embed_tokens.weight"]))
