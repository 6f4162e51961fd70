"""Adaptation (paper section 3.2): the mapping is checked tensor by tensor against its
sources, end to end (with cross-attention switched off the adapted decoder IS the source
decoder-only model), in transformers, and on bad input."""

import json
import os

import numpy as np
import pytest

import cases
from helpers import RTOL_F32, assert_close
from minencdec import cli
from minencdec.model import gemma2, t5gemma
from minencdec.model.adapt import adapt_params, map_name
from minencdec.files.checkpoint import CheckpointError, save_tensors
from minencdec.model.config import GemmaConfig
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained

SMALL = cases.GEMMA2_CASES["gqa_odd"]                                     # D 16, 3 layers, vocab 64
LARGE = SMALL.replace(hidden_size=24, num_hidden_layers=4, intermediate_size=40)  # a wider, deeper "9B"


def random_gemma2(config: GemmaConfig, seed):
    params = cases.random_params(gemma2.param_shapes(config), seed)
    return gemma2.Gemma2Model(config, params, "float64")


@pytest.fixture
def checkpoints(tmp_path):
    small, large = random_gemma2(SMALL, 1), random_gemma2(LARGE, 2)
    small.save_pretrained(tmp_path / "small")
    large.save_pretrained(tmp_path / "large")
    (tmp_path / "small" / "tokenizer.model").write_bytes(b"not a real sentencepiece model")
    return tmp_path, small, large


def test_balanced_copies_every_tensor_and_cross_attention_from_self(checkpoints):
    tmp, small, _ = checkpoints
    config, mode = adapt_checkpoints(tmp / "small", tmp / "small", tmp / "t5", dtype="float64")
    assert mode == "copy"
    adapted = load_pretrained(tmp / "t5", "float64", expect="t5gemma")
    for name, src in small.params.items():                       # encoder and decoder: exact copies
        for side in ("encoder", "decoder"):
            assert np.array_equal(adapted.params[map_name(name, side)], src), name
    assert map_name("model.layers.3.input_layernorm.weight", "encoder") == \
        "model.encoder.layers.3.pre_self_attn_layernorm.weight"
    for i in range(SMALL.num_hidden_layers):                     # cross == self, norms included
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert np.array_equal(adapted.params[f"{p}cross_attn.{proj}.weight"],
                                  small.params[f"model.layers.{i}.self_attn.{proj}.weight"])
        assert np.array_equal(adapted.params[f"{p}pre_cross_attn_layernorm.weight"],
                              small.params[f"model.layers.{i}.input_layernorm.weight"])
        assert np.array_equal(adapted.params[f"{p}post_cross_attn_layernorm.weight"],
                              small.params[f"model.layers.{i}.post_attention_layernorm.weight"])
    assert (tmp / "t5" / "tokenizer.model").read_bytes() == b"not a real sentencepiece model"


def test_without_cross_attention_the_decoder_is_the_source_model(checkpoints):
    """The end-to-end proof of the name mapping: switch cross-attention off and the adapted
    decoder must give the source Gemma 2 model's logits on the same tokens, bit for bit."""
    tmp, small, large = checkpoints
    adapt_checkpoints(tmp / "large", tmp / "small", tmp / "t5", dtype="float64")
    adapted = load_pretrained(tmp / "t5", "float64")
    ids = np.random.default_rng(0).integers(3, 64, (2, 9))
    source = small.logits(ids)
    got = adapted.logits(ids, ids, cross_attention=False)
    assert np.array_equal(got, source)
    # Negative control: with cross-attention on, the logits do change.
    assert not np.allclose(adapted.logits(ids, ids), source)


def test_unbalanced_pair_random_cross_attention(checkpoints):
    tmp, small, large = checkpoints
    config, mode = adapt_checkpoints(tmp / "large", tmp / "small", tmp / "t5", seed=7, dtype="float64")
    assert mode == "random"
    adapted = load_pretrained(tmp / "t5", "float64")
    assert adapted.config.encoder.hidden_size == 24 and adapted.config.decoder.hidden_size == 16
    for name, src in large.params.items():
        assert np.array_equal(adapted.params[map_name(name, "encoder")], src)
    cross = t5gemma.cross_attention_names(config)
    assert len(cross) == 6 * SMALL.num_hidden_layers
    k = adapted.params["model.decoder.layers.0.cross_attn.k_proj.weight"]
    assert k.shape == (SMALL.num_key_value_heads * SMALL.head_dim, 24)   # reads the encoder width
    assert abs(k.std() - 0.02) < 0.005                                   # normal(0, 0.02)
    assert np.all(adapted.params["model.decoder.layers.0.pre_cross_attn_layernorm.weight"] == 0)
    # The same seed gives the same weights; another seed other weights.
    adapt_checkpoints(tmp / "large", tmp / "small", tmp / "again", seed=7, dtype="float64")
    again = load_pretrained(tmp / "again", "float64")
    assert all(np.array_equal(again.params[n], adapted.params[n]) for n in cross)
    _, other, _ = adapt_params(large.params, LARGE, small.params, SMALL, "random", seed=8)
    k_name = "model.decoder.layers.0.cross_attn.k_proj.weight"
    assert not np.array_equal(other[k_name], adapted.params[k_name])
    assert json.loads((tmp / "t5" / "config.json").read_text())["minencdec_adaptation"]["cross_attn"] == "random"


@pytest.mark.parametrize("pair", [("small", "small"), ("large", "small")])
def test_transformers_loads_the_adapted_checkpoint(checkpoints, pair):
    torch = pytest.importorskip("torch")
    from transformers import T5GemmaForConditionalGeneration
    tmp, _, _ = checkpoints
    adapt_checkpoints(tmp / pair[0], tmp / pair[1], tmp / "t5", save_dtype="float32")
    theirs = T5GemmaForConditionalGeneration.from_pretrained(tmp / "t5", attn_implementation="eager").eval()
    ours = load_pretrained(tmp / "t5", "float32")
    ids = np.random.default_rng(1).integers(3, 64, (2, 7))
    dec = np.random.default_rng(2).integers(3, 64, (2, 5))
    with torch.no_grad():
        want = theirs(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                      decoder_input_ids=torch.tensor(dec), use_cache=False).logits.numpy()
    assert_close("adapted logits vs transformers", ours.logits(ids, dec), want, RTOL_F32)


def test_bad_pairs_fail_before_anything_is_written(checkpoints):
    tmp, small, _ = checkpoints
    other_vocab = random_gemma2(SMALL.replace(vocab_size=80), 3)
    other_vocab.save_pretrained(tmp / "vocab80")
    with pytest.raises(ValueError, match="vocab_size 80 .* has 64|vocab_size 64 .* has 80"):
        adapt_checkpoints(tmp / "vocab80", tmp / "small", tmp / "out")
    with pytest.raises(ValueError, match="copy needs equal widths.*24.*16"):
        adapt_checkpoints(tmp / "large", tmp / "small", tmp / "out", cross_attn="copy")
    adapt_checkpoints(tmp / "small", tmp / "small", tmp / "t5")
    with pytest.raises(CheckpointError, match="encoder-decoder checkpoint, but a decoder-only"):
        adapt_checkpoints(tmp / "t5", tmp / "small", tmp / "out")
    with pytest.raises(CheckpointError, match="decoder-only checkpoint, but an encoder-decoder"):
        load_pretrained(tmp / "small", expect="t5gemma")
    assert not (tmp / "out").exists()
    assert sorted(os.listdir(tmp)) == ["large", "small", "t5", "vocab80"]   # no temporary leftovers


def test_adapt_command(checkpoints, capsys):
    tmp, _, _ = checkpoints
    assert cli.main(["adapt", "--encoder-from", str(tmp / "large"), "--decoder-from", str(tmp / "small"),
                     "--out", str(tmp / "cmd")]) == 0
    assert "cross-attention random" in capsys.readouterr().out
    assert cli.main(["adapt", "--encoder-from", str(tmp / "large"), "--decoder-from", str(tmp / "small"),
                     "--out", str(tmp / "bad"), "--cross-attn", "copy"]) == 2
    assert "copy needs equal widths" in capsys.readouterr().err
    assert not (tmp / "bad").exists()


def test_cross_attention_width_that_does_not_fit_is_named(checkpoints):
    """Stored cross-attention k/v that read another width than the encoder's."""
    tmp, _, _ = checkpoints
    adapt_checkpoints(tmp / "large", tmp / "small", tmp / "t5", dtype="float64")
    model = load_pretrained(tmp / "t5", "float64")
    params = dict(model.params)
    name = "model.decoder.layers.1.cross_attn.v_proj.weight"
    params[name] = np.zeros((16, 20))                             # the encoder is 24 wide
    save_tensors(tmp / "bad", params, model.config.to_hf_dict())
    with pytest.raises(CheckpointError, match=r"1 shape mismatch.*layers.1.cross_attn.v_proj.weight has "
                                              r"shape \(16, 20\).*expects \(16, 24\)"):
        load_pretrained(tmp / "bad")


def test_a_model_built_from_shared_arrays_owns_its_parameters():
    """adapt_params shares arrays between names (balanced: cross == self == encoder); the
    model must not, or an in-place optimizer step would update one array several times."""
    small = random_gemma2(SMALL, 1)
    config, params, _ = adapt_params(small.params, SMALL, small.params, SMALL, "copy")
    q = "model.decoder.layers.0.cross_attn.q_proj.weight"
    assert params[q] is params["model.decoder.layers.0.self_attn.q_proj.weight"]   # shared on purpose
    model = t5gemma.T5GemmaModel(config, params, "float64")
    arrays = list(model.params.values())
    for i, a in enumerate(arrays):
        assert not any(np.may_share_memory(a, b) for b in arrays[i + 1:])
    model.params[q] += 1.0                                        # one name changes, no other
    assert np.array_equal(model.params["model.decoder.layers.0.self_attn.q_proj.weight"],
                          small.params["model.layers.0.self_attn.q_proj.weight"])
