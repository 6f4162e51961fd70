"""Configurations: every bad value is refused with the field named, before any model is
built; config.json round trips; what is not supported is refused, never ignored.

Each bad value here reproduces a reported failure (NaN or garbage logits with exit 0, or a
traceback): rope_theta 0, a negative eps, a NaN query_pre_attn_scalar, a softcap of 0, a
negative window, a bos id outside the vocabulary, "128" or 32.0 as a size, a 4.x
rope_scaling that was silently dropped, rope_parameters as a list, an untied T5Gemma head.
The negative control is the valid config each bad one is made from: it is accepted.
"""

import math

import pytest

from minencdec.model.config import GemmaConfig, T5GemmaConfig, gemma3_config
from minencdec.model.presets import PRESETS

# A transformers 4.x style config.json (rope_theta at the top level, which 5.x's
# rope_parameters would override).
GOOD = {k: v for k, v in PRESETS["nano"].to_hf_dict().items() if k != "rope_parameters"}

BAD_FIELDS = [
    ("rope_theta", 0, "rope_theta"), ("rope_theta", -1.0, "rope_theta"), ("rms_norm_eps", -1e-6, "rms_norm_eps"),
    ("rms_norm_eps", 0, "rms_norm_eps"), ("query_pre_attn_scalar", math.nan, "query_pre_attn_scalar"),
    ("attn_logit_softcapping", 0, "attn_logit_softcapping"), ("final_logit_softcapping", -30.0, "final_logit_softcapping"),
    ("sliding_window", -4, "sliding_window"), ("sliding_window", 0, "sliding_window"),
    ("bos_token_id", 512, "bos_token_id"), ("pad_token_id", -1, "pad_token_id"),
    ("hidden_size", "128", "hidden_size"), ("hidden_size", 32.0, "hidden_size"), ("num_hidden_layers", True, "num_hidden_layers"),
    ("vocab_size", 0, "vocab_size"), ("max_position_embeddings", 1.5, "max_position_embeddings"),
    ("head_dim", 7, "head_dim must be even"), ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
]


def test_the_valid_config_is_accepted():
    assert GemmaConfig.from_hf_dict(GOOD) == PRESETS["nano"]


@pytest.mark.parametrize("field,value,named", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_values_are_refused_with_the_field_named(field, value, named):
    with pytest.raises(ValueError, match=named) as e:
        GemmaConfig.from_hf_dict({**GOOD, field: value}, "ck/config.json")
    assert "ck/config.json" in str(e.value)
    with pytest.raises(ValueError, match=named):                  # the same from Python
        PRESETS["nano"].replace(**{field: value})


@pytest.mark.parametrize("changes,named", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling has rope_type 'linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"rope_parameters": [{"rope_type": "default"}]}, "rope_parameters must be an object"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_activation": "relu"}, "hidden_activation"),
])
def test_unsupported_settings_are_refused_not_ignored(changes, named):
    with pytest.raises(ValueError, match=named):
        GemmaConfig.from_hf_dict({**GOOD, **changes})


def test_t5gemma_untied_head_is_refused():
    good = T5GemmaConfig(PRESETS["nano"], PRESETS["nano"]).to_hf_dict()
    assert T5GemmaConfig.from_hf_dict(good).decoder.is_decoder
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        T5GemmaConfig.from_hf_dict({**good, "tie_word_embeddings": False})


def test_gemma3_rope_from_transformers_4_and_5_configs():
    """transformers 5 writes rope_parameters per layer type; 4.x wrote rope_theta,
    rope_local_base_freq and rope_scaling (Gemma 3 4B: linear, factor 8 on full layers)."""
    want = PRESETS["gemma3-4b"]
    five = want.to_hf_dict()
    assert five["rope_parameters"] == {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert GemmaConfig.from_hf_dict(five, family="gemma3") == want
    four = {k: v for k, v in five.items() if k != "rope_parameters"}
    four.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0})
    assert GemmaConfig.from_hf_dict(four, family="gemma3") == want
    bare = {k: v for k, v in four.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    defaults = GemmaConfig.from_hf_dict(bare, family="gemma3")     # transformers' Gemma 3 defaults
    assert (defaults.rope_theta, defaults.rope_local_base_freq, defaults.rope_scaling_factor) == (1e6, 1e4, 1.0)
    with pytest.raises(ValueError, match="sliding_attention.*rope_type 'linear'"):
        GemmaConfig.from_hf_dict({**five, "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}, family="gemma3")


def test_gemma3_rope_and_layer_pattern():
    c = gemma3_config(num_hidden_layers=8, sliding_window=4, rope_scaling_factor=8.0)
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",) + ("sliding_attention",) * 2
    assert c.rope_of_type("sliding_attention") == (1e4, 1.0) and c.rope_of_type("full_attention") == (1e6, 8.0)
    assert c.qk_norm and not PRESETS["nano"].qk_norm
    assert c.bidirectional_window == "t5gemma2" and PRESETS["nano"].bidirectional_window == "le"
    with pytest.raises(ValueError, match="Gemma 3 fields"):
        PRESETS["nano"].replace(rope_local_base_freq=1e4)
    # transformers' Gemma 3 reads attn_logit_softcapping but never applies it: refused, not ignored.
    with pytest.raises(ValueError, match="never apply it"):
        c.replace(attn_logit_softcapping=50.0)


def test_t5gemma2_config_round_trip_and_checks():
    g3 = PRESETS["gemma3-270m"]
    pair = T5GemmaConfig(g3, g3.replace(num_hidden_layers=6))
    assert pair.family == "t5gemma2" and pair.merged_attention and pair.eoi_token_index == 256_000
    d = pair.to_hf_dict()
    assert d["model_type"] == "t5gemma2" and d["encoder"]["text_config"]["num_hidden_layers"] == 18
    assert T5GemmaConfig.from_hf_dict(d) == pair
    with pytest.raises(ValueError, match="widths must be equal"):
        T5GemmaConfig(g3, g3.replace(hidden_size=512))
    with pytest.raises(ValueError, match="one family"):
        T5GemmaConfig(g3.replace(vocab_size=512), PRESETS["nano"])
    with pytest.raises(ValueError, match="eoi_token_index is a T5Gemma 2 field"):
        T5GemmaConfig(PRESETS["nano"], PRESETS["nano"], eoi_token_index=5)
