"""Adaptation (paper section 3.2): turn decoder-only Gemma weights into an encoder-decoder.

Gemma 2 sources give a T5Gemma:

    encoder (all layers, embedding, final norm)   <- the encoder source (the larger model)
    decoder self-attention, MLP, norms, embedding <- the decoder source (the smaller model)
    cross-attention, "copy"   <- the same decoder layer's self-attention q/k/v/o and its two norms
    cross-attention, "random" <- freshly initialised, then warmed up alone (paper section 3.2)

Gemma 3 sources give a T5Gemma 2 (the recipe carried to Gemma 3), a pure copy ("merged"):
each layer i into encoder and decoder layer i, the final norm into both, the decoder
source's embedding into the one shared table, and `eoi_embedding` = that table's row
`eoi_token_index` (256000) times sqrt(d), exactly as the embedding scales it (zeros, as
transformers initialises it, when the vocabulary has no such row). Merged attention has no
weights of its own, so with every encoder key masked the decoder computes the source's
logits exactly.

Names map as  input_layernorm -> pre_self_attn_layernorm,
              post_attention_layernorm -> post_self_attn_layernorm,
              model.X -> model.encoder.X / model.decoder.X;  every other name is unchanged.

"copy" needs the cross-attention's k/v to read the encoder's width with the decoder's
self-attention shapes, so it works exactly when both widths are equal; "auto" picks "copy"
then and "random" otherwise (an unbalanced pair such as 9B-2B).

"random" initialises the cross-attention as transformers initialises a new T5Gemma model:
q/k/v/o ~ normal(0, 0.02) and RMSNorm offsets 0. Why that and not something cleverer: it is
what the paper's "randomly initialised" means for these checkpoints, and it is reproducible
in any framework from the seed. Note the consequence the warmup exists for: the post-norm
rescales the branch to unit size whatever the weights' scale, so at step 0 random
cross-attention adds O(1) noise to every decoder layer; training only these tensors first
(`cross_attention_names`) lets them become useful before the rest of the model moves.
"""

from __future__ import annotations

import numpy as np

from .config import GemmaConfig, T5GemmaConfig
from .t5gemma import EOI, ENC_EMBED, cross_attention_names, param_shapes

_RENAME = {"input_layernorm": "pre_self_attn_layernorm", "post_attention_layernorm": "post_self_attn_layernorm"}
_CROSS_FROM_SELF = {"cross_attn.q_proj": "self_attn.q_proj", "cross_attn.k_proj": "self_attn.k_proj",
                    "cross_attn.v_proj": "self_attn.v_proj", "cross_attn.o_proj": "self_attn.o_proj",
                    "pre_cross_attn_layernorm": "input_layernorm",
                    "post_cross_attn_layernorm": "post_attention_layernorm"}


def map_name(gemma2_name: str, side: str) -> str:
    """A Gemma 2 tensor name -> its T5Gemma name on `side` ("encoder" or "decoder")."""
    assert gemma2_name.startswith("model.") and side in ("encoder", "decoder")
    rest = gemma2_name[len("model."):]
    for old, new in _RENAME.items():
        rest = rest.replace(f".{old}.", f".{new}.")
    return f"model.{side}.{rest}"


def adapted_config(encoder_from: GemmaConfig, decoder_from: GemmaConfig, eoi_token_index=None) -> T5GemmaConfig:
    """The T5Gemma config of a pair; the vocabularies must agree (one token space).
    `eoi_token_index`: T5Gemma 2's eoi token (None: 256000, its id in Gemma 3's vocabulary;
    a trimmed vocabulary renumbers it, io/vocab.py)."""
    if encoder_from.vocab_size != decoder_from.vocab_size:
        raise ValueError(f"the encoder source has vocab_size {encoder_from.vocab_size} but the decoder "
                         f"source has {decoder_from.vocab_size}: adaptation needs one shared vocabulary")
    for field in ("pad_token_id", "eos_token_id", "bos_token_id", "family"):
        if getattr(encoder_from, field) != getattr(decoder_from, field):
            raise ValueError(f"the two sources disagree on {field}")
    if encoder_from.family == "gemma3" and encoder_from.hidden_size != decoder_from.hidden_size:
        raise ValueError(f"T5Gemma 2 needs sources of one width (merged attention projects the encoder "
                         f"output with the decoder's k/v): {encoder_from.hidden_size} vs {decoder_from.hidden_size}")
    return T5GemmaConfig(encoder_from, decoder_from,
                         eoi_token_index=eoi_token_index if encoder_from.family == "gemma3" else None)


def resolve_cross_attn(mode: str, config: T5GemmaConfig) -> str:
    """"auto" -> "copy" for equal widths, else "random"; "copy" with unequal widths is an error.
    T5Gemma 2 has no cross-attention to initialise: "auto" (or "merged") -> "merged"."""
    if config.merged_attention:
        if mode not in ("auto", "merged"):
            raise ValueError(f"cross-attention initialisation {mode!r} does not apply to Gemma 3 sources: "
                             "T5Gemma 2's merged attention reuses self-attention's weights (use auto)")
        return "merged"
    same_width = config.encoder.hidden_size == config.decoder.hidden_size
    if mode == "auto":
        return "copy" if same_width else "random"
    if mode == "copy" and not same_width:
        raise ValueError(f"--cross-attn copy needs equal widths, but the encoder is "
                         f"{config.encoder.hidden_size} wide and the decoder {config.decoder.hidden_size}: "
                         "cross-attention k/v must read the encoder width (use random)")
    if mode not in ("copy", "random"):
        raise ValueError(f"cross-attention initialisation must be auto, copy or random, got {mode!r}")
    return mode


def adapt_params(encoder_params: dict, encoder_config: GemmaConfig, decoder_params: dict,
                 decoder_config: GemmaConfig, cross_attn="auto", seed=0, std=0.02, eoi_token_index=None):
    """(T5GemmaConfig, params, mode). The source dicts are Gemma 2 or Gemma 3 params (HF
    names); the result shares their arrays (no copy), so adapting a 2B model needs no second 10 GB.
    Writing the result to disk is safe as it is; `T5GemmaModel(config, params)` copies the
    arrays that are shared between names (every parameter must own its memory to train),
    but the source model's arrays are still shared with it: train a copy, or reload."""
    config = adapted_config(encoder_config, decoder_config, eoi_token_index)
    mode = resolve_cross_attn(cross_attn, config)
    params = {}
    for side, source in (("encoder", encoder_params), ("decoder", decoder_params)):
        for name, array in source.items():
            if name != "lm_head.weight":                          # tied to the embedding
                params[map_name(name, side)] = array
    if mode == "merged":                                          # T5Gemma 2: one table, and eoi
        table = params.pop(map_name("model.embed_tokens.weight", "decoder"))
        params[ENC_EMBED] = table
        eoi, D = config.eoi_token_index, table.shape[1]
        params[EOI] = (table[eoi] * np.asarray(np.sqrt(D), dtype=table.dtype) if eoi < table.shape[0]
                       else np.zeros(D, dtype=table.dtype))       # as embedding_forward scales the row
    rng = np.random.default_rng(seed)
    dtype = next(iter(decoder_params.values())).dtype
    shapes = param_shapes(config)
    for name in cross_attention_names(config):                    # layer order: reproducible per seed
        layer, part = name[len("model.decoder.layers."):].split(".", 1)
        part = part[: -len(".weight")]
        if mode == "copy":
            params[name] = decoder_params[f"model.layers.{layer}.{_CROSS_FROM_SELF[part]}.weight"]
        elif len(shapes[name]) == 1:
            params[name] = np.zeros(shapes[name], dtype=dtype)    # RMSNorm offset 0: scale 1
        else:
            params[name] = rng.normal(0.0, std, shapes[name]).astype(dtype)
    missing = sorted(set(shapes) - set(params))
    unknown = sorted(set(params) - set(shapes))
    if missing or unknown:                                        # a source that is not a Gemma 2 model
        raise ValueError(f"adaptation produced missing {missing[:4]} / unknown {unknown[:4]} tensors")
    return config, params, mode
