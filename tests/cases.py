"""Tiny test configurations, deterministic random parameters and inputs, and the golden files.

Nothing here imports torch: the NumPy model's tests use these cases with the live
`transformers` oracle (`oracle_hf.py`) when torch is installed, and with the committed golden
files (`golden/*.safetensors`, written by `golden/make_golden.py`) when it is not.

Tensor names and shapes are the Hugging Face ones (transformers' `models/gemma2`, `t5gemma`,
`gemma3` and `t5gemma2` modules). `gemma2_param_shapes` / `t5gemma_param_shapes` /
`gemma3_param_shapes` / `t5gemma2_param_shapes` list them from the config alone;
`test_oracle.py` and `model/test_oracle_gemma3.py` check them against a freshly built
`transformers` model.

Cases: GEMMA2_CASES, T5GEMMA_CASES (Gemma 2 family; GOLDEN) and GEMMA3_CASES, T5GEMMA2_CASES
(Gemma 3 family; GOLDEN_GEMMA3). Case names are unique across the four lists.

Padding and what may be compared
--------------------------------
`random_inputs` pads row 1 on the right and row 2 on the left. A query at a padding position
may see no key at all (a left-padded query in a causal model): such fully masked rows are
implementation-defined (transformers, made float64-exact, averages *all* values uniformly,
because its mask is the dtype's minimum, not -inf; unpatched float64 transformers gives NaN).
So comparisons must only look at non-pad positions: `valid_positions(mask)`. The labels are
built so that the loss and every gradient depend on non-pad positions only (see
`random_inputs`), so loss and gradients are fully comparable.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from minencdec.model.config import FULL, SLIDING, GemmaConfig, T5GemmaConfig, gemma3_config

PAD, EOS, BOS = 0, 1, 2
IGNORE = -100                       # label value ignored by the loss
FIRST_ID = 3                        # random ids avoid pad/eos/bos (see random_inputs)
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
GOLDEN_FORMAT_VERSION = "1"
# Golden file keys: "param.<name>", "grad.<name>", these inputs, and the outputs "logits",
# "loss", "encoder_out" (T5Gemma LM) and "pooled_index" (classification).
INPUT_KEYS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask")


def _g(**kw) -> GemmaConfig:
    return GemmaConfig(**{"vocab_size": 64, "max_position_embeddings": 64, **kw})


# Decoder-only Gemma 2. Axis legend: V vocab, D width, F ffn, L layers, H heads, K kv heads,
# Dh head dim, qpas query_pre_attn_scalar, w sliding window. Inputs are T = 7 tokens long.
# hidden_size must be a multiple of the head count (a transformers config check), even
# though head_dim is free.
GEMMA2_CASES: dict[str, GemmaConfig] = {
    # GQA 4/2, head_dim 8 != D/H = 4, qpas 12 != head_dim, window 3 < T, odd L = 3, caps 50/30.
    "gqa_odd": _g(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=3),
    # MQA (one kv head), head_dim 12 != D/H = 8, softcaps off, window 2.
    "mqa_nocap": _g(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12, sliding_window=2,
                    attn_logit_softcapping=None, final_logit_softcapping=None),
    # Small caps that bite with the random weights (attention scores and logits reach several
    # times the cap), plain multi-head attention, window 4.
    "small_caps": _g(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=4, query_pre_attn_scalar=4, sliding_window=4,
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    # Explicit layer_types (full, sliding, sliding), attention cap off but final cap on, window 1
    # (a sliding layer sees only itself).
    "mixed_types": _g(vocab_size=48, hidden_size=12, intermediate_size=20, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=6, query_pre_attn_scalar=8,
                      sliding_window=1, layer_types=(FULL, SLIDING, SLIDING),
                      attn_logit_softcapping=None, final_logit_softcapping=30.0),
}

# Encoder-decoder. Inputs: encoder length S = 8, decoder length T = 6.
T5GEMMA_CASES: dict[str, T5GemmaConfig] = {
    # Balanced pair, GQA 4/2, head_dim 6 != qpas 8, window 3 < S, T (bidirectional: 7 keys).
    "balanced": T5GemmaConfig(
        encoder=_g(vocab_size=48, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=6, query_pre_attn_scalar=8,
                   sliding_window=3),
        decoder=_g(vocab_size=48, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=6, query_pre_attn_scalar=8,
                   sliding_window=3)),
    # Unbalanced (9B-2B in small): wider, deeper encoder (D 16, L 3, GQA 4/2, Dh 8) and a narrow
    # MQA decoder (D 8, L 2, H 2, K 1, Dh 6, qpas 10); cross-attention k/v read width 16.
    # Window 2 < S, T.
    "unbalanced": T5GemmaConfig(
        encoder=_g(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                   sliding_window=2),
        decoder=_g(vocab_size=48, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=6, query_pre_attn_scalar=10,
                   sliding_window=2)),
    # MQA everywhere; the encoder has no attention cap, the decoder small caps that bite (its
    # cross-attention is capped too, with the decoder's cap); layer_types (sliding, sliding).
    "mqa_caps": T5GemmaConfig(
        encoder=_g(vocab_size=48, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=3, num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=4,
                   sliding_window=1, attn_logit_softcapping=None, final_logit_softcapping=None),
        decoder=_g(vocab_size=48, hidden_size=12, intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=3, num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=4,
                   sliding_window=2, layer_types=(SLIDING, SLIDING),
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
}


def _g3(**kw) -> GemmaConfig:
    return gemma3_config(**{"vocab_size": 64, "max_position_embeddings": 64, **kw})


# Decoder-only Gemma 3 (Gemma3ForCausalLM), T = 7 as Gemma 2. Every stack has QK-norm; RoPE
# bases are Gemma 3's defaults (full 1e6, sliding 1e4) unless set. attn_logit_softcapping stays
# None: transformers' Gemma 3 never applies it (model/test_models_gemma3.py: an xfail).
GEMMA3_CASES: dict[str, GemmaConfig] = {
    # GQA 4/2, head_dim 8 != D/H = 4, qpas 12 != head_dim, window 3 < T, layer types mixed
    # (sliding, full, sliding), linear RoPE scaling 8 on the full layer, softcaps off.
    "gqa_mixed": _g3(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=3,
                     layer_types=(SLIDING, FULL, SLIDING), rope_scaling_factor=8.0),
    # MQA, head_dim 12 != D/H = 8, all layers global, small RoPE base 100 scaled by 2, a final
    # softcap that bites (see CASE_STD).
    "mqa_global": _g3(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=12, query_pre_attn_scalar=12, sliding_window=4,
                      layer_types=(FULL, FULL), rope_theta=100.0, rope_scaling_factor=2.0,
                      final_logit_softcapping=3.0),
    # The default 5:1 pattern (five sliding layers, then a full one) over six layers, window 2,
    # MHA 2/2, both RoPE bases set (sliding 50, full 500).
    "pattern": _g3(vocab_size=48, hidden_size=8, intermediate_size=16, num_hidden_layers=6, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=4, query_pre_attn_scalar=6, sliding_window=2,
                   rope_theta=500.0, rope_local_base_freq=50.0, final_logit_softcapping=30.0),
}

# T5Gemma 2 (T5Gemma2ForConditionalGeneration): two Gemma 3 stacks of one width, merged
# attention in the decoder. Inputs: S = 8, T = 6; `eoi_token_index` inside the vocabulary
# (case_inputs puts it into the encoder input and the labels).
T5GEMMA2_CASES: dict[str, T5GemmaConfig] = {
    # Unequal depths (3 encoder, 2 decoder layers); encoder GQA 4/2, decoder MQA 4/1; head_dim 6
    # != D/H = 3, qpas 8; encoder window 4 < S (even: T5Gemma 2 sees 1 key left, 2 right),
    # decoder window 2 < T; layer types mixed; linear RoPE scaling 4 on full layers.
    "unequal_depth": T5GemmaConfig(
        _g3(vocab_size=48, hidden_size=12, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=6, query_pre_attn_scalar=8, sliding_window=4,
            layer_types=(SLIDING, FULL, SLIDING), rope_scaling_factor=4.0),
        _g3(vocab_size=48, hidden_size=12, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=6, query_pre_attn_scalar=8, sliding_window=2,
            layer_types=(FULL, SLIDING), rope_scaling_factor=4.0),
        eoi_token_index=40),
    # Encoder all global (2 layers, MHA 3/3, head_dim 4 = D/H = qpas); a deeper decoder (3 layers,
    # MQA 3/1, qpas 5, window 3 < T) with a final softcap that bites; RoPE bases 200 (full) and
    # 20 (sliding); eoi_token_index 5.
    "global_cap": T5GemmaConfig(
        _g3(vocab_size=48, hidden_size=12, intermediate_size=16, num_hidden_layers=2, num_attention_heads=3,
            num_key_value_heads=3, head_dim=4, query_pre_attn_scalar=4, sliding_window=3,
            layer_types=(FULL, FULL), rope_theta=200.0, rope_local_base_freq=20.0),
        _g3(vocab_size=48, hidden_size=12, intermediate_size=16, num_hidden_layers=3, num_attention_heads=3,
            num_key_value_heads=1, head_dim=4, query_pre_attn_scalar=5, sliding_window=3,
            layer_types=(SLIDING, SLIDING, FULL), rope_theta=200.0, rope_local_base_freq=20.0,
            final_logit_softcapping=3.0),
        eoi_token_index=5),
}

# Weight std per case (default PARAM_STD). 0.3 keeps activations O(1); the small-cap cases use
# more so that attention scores and logits are well beyond the cap.
PARAM_STD = 0.3
NORM_STD = 0.3
CASE_STD = {"small_caps": 0.6, "mqa_caps": 0.6, "mqa_global": 0.6, "global_cap": 0.6}
NUM_LABELS = 3                      # classification cases


# --------------------------------------------------------------------------- parameter names

def _stack_shapes(prefix: str, c: GemmaConfig, norms: tuple[str, ...], cross_width: int | None = None):
    D, F, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    shapes = {f"{prefix}embed_tokens.weight": (c.vocab_size, D)}
    for i in range(c.num_hidden_layers):
        p = f"{prefix}layers.{i}."
        blocks = [("self_attn", D)] + ([("cross_attn", cross_width)] if cross_width else [])
        for block, src in blocks:
            shapes.update({f"{p}{block}.q_proj.weight": (q, D), f"{p}{block}.k_proj.weight": (kv, src),
                           f"{p}{block}.v_proj.weight": (kv, src), f"{p}{block}.o_proj.weight": (D, q)})
        shapes.update({f"{p}mlp.gate_proj.weight": (F, D), f"{p}mlp.up_proj.weight": (F, D),
                       f"{p}mlp.down_proj.weight": (D, F)})
        shapes.update({f"{p}{n}.weight": (D,) for n in norms})
    shapes[f"{prefix}norm.weight"] = (D,)
    return shapes


_GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm")
_T5_NORMS = ("pre_self_attn_layernorm", "post_self_attn_layernorm",
             "pre_feedforward_layernorm", "post_feedforward_layernorm")


def gemma2_param_shapes(config: GemmaConfig, num_labels: int | None = None) -> dict[str, tuple]:
    """Gemma2ForCausalLM tensor names -> shapes (tied lm_head.weight excluded). With
    `num_labels`, Gemma2ForSequenceClassification's: the same plus `score.weight` (no bias)."""
    shapes = _stack_shapes("model.", config, _GEMMA2_NORMS)
    if num_labels:
        shapes["score.weight"] = (num_labels, config.hidden_size)
    return shapes


def t5gemma_param_shapes(config: T5GemmaConfig, num_labels: int | None = None,
                         is_encoder_decoder: bool = True) -> dict[str, tuple]:
    """T5GemmaForConditionalGeneration tensor names -> shapes (tied lm_head.out_proj.weight
    excluded). With `num_labels`, T5GemmaForSequenceClassification's: encoder only (or encoder
    and decoder when `is_encoder_decoder`) plus `score.out_proj.{weight,bias}`."""
    enc, dec = config.encoder, config.decoder
    shapes = _stack_shapes("model.encoder.", enc, _T5_NORMS)
    if is_encoder_decoder:
        shapes.update(_stack_shapes("model.decoder.", dec, _T5_NORMS + ("pre_cross_attn_layernorm",
                                    "post_cross_attn_layernorm"), cross_width=enc.hidden_size))
    if num_labels:
        width = dec.hidden_size if is_encoder_decoder else enc.hidden_size
        shapes.update({"score.out_proj.weight": (num_labels, width), "score.out_proj.bias": (num_labels,)})
    return shapes


def _qk_norm_shapes(prefix: str, c: GemmaConfig) -> dict[str, tuple]:
    return {f"{prefix}layers.{i}.self_attn.{n}.weight": (c.head_dim,)
            for i in range(c.num_hidden_layers) for n in ("q_norm", "k_norm")}


def gemma3_param_shapes(config: GemmaConfig) -> dict[str, tuple]:
    """Gemma3ForCausalLM tensor names -> shapes (tied lm_head.weight excluded): Gemma 2's plus
    each layer's self_attn.q_norm / k_norm (head_dim,)."""
    return {**_stack_shapes("model.", config, _GEMMA2_NORMS), **_qk_norm_shapes("model.", config)}


def t5gemma2_param_shapes(config: T5GemmaConfig) -> dict[str, tuple]:
    """T5Gemma2ForConditionalGeneration's text tensors under the checkpoint's names: the encoder
    owns the one table (`model.encoder.embed_tokens.weight`, plus `.eoi_embedding` (D,)); the
    decoder has no table of its own and no cross_attn (its self_attn is the merged attention).
    Both stacks have QK-norm. Tied decoder table / LM head and the vision tower excluded."""
    enc, dec = config.encoder, config.decoder
    shapes = {**_stack_shapes("model.encoder.", enc, _T5_NORMS), **_qk_norm_shapes("model.encoder.", enc),
              "model.encoder.embed_tokens.eoi_embedding": (enc.hidden_size,)}
    decoder = _stack_shapes("model.decoder.", dec, _T5_NORMS)
    del decoder["model.decoder.embed_tokens.weight"]
    return {**shapes, **decoder, **_qk_norm_shapes("model.decoder.", dec)}


def param_shapes(config, num_labels=None, is_encoder_decoder=True) -> dict[str, tuple]:
    if isinstance(config, T5GemmaConfig):
        if config.family == "t5gemma2":
            return t5gemma2_param_shapes(config)
        return t5gemma_param_shapes(config, num_labels, is_encoder_decoder)
    if config.family == "gemma3":
        return gemma3_param_shapes(config)
    return gemma2_param_shapes(config, num_labels)


# --------------------------------------------------------------------------- random data

def _name_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def case_seed(name: str) -> int:
    """A stable seed from a case name (independent of Python's hash randomisation)."""
    return zlib.crc32(name.encode()) % 2**31


def random_params(shapes: dict[str, tuple], seed: int, std: float = PARAM_STD,
                  norm_std: float = NORM_STD) -> dict[str, np.ndarray]:
    """float64 parameters: weights and biases N(0, std^2); RMSNorm weights N(0, norm_std^2), so
    the effective scale 1 + w is random and never the identity (zeros would hide a forgotten `1 +`).

    Each tensor has its own generator seeded by (seed, name), so the values do not depend on
    the order of `shapes` (cases.py's order or transformers')."""
    params = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(_name_seed(seed, name))
        s = norm_std if name.endswith("norm.weight") else std
        params[name] = rng.normal(0.0, s, size=shape)
    return params


def _padding_mask(rng, B: int, L: int) -> np.ndarray:
    """Row r % 3 == 0: no padding; 1: right padding; 2: left padding (2 + r // 3 pads)."""
    mask = np.ones((B, L), dtype=np.int64)
    for r in range(B):
        n = min(2 + r // 3, L - 2)
        if r % 3 == 1:
            mask[r, L - n:] = 0
        elif r % 3 == 2:
            mask[r, :n] = 0
    return mask


def shift_right(labels: np.ndarray, bos: int = BOS, pad: int = PAD) -> np.ndarray:
    """T5Gemma decoder inputs from labels, as transformers' `_shift_right`: bos in front, the
    last label dropped, and -100 replaced by pad."""
    out = np.empty_like(labels)
    out[:, 0] = bos
    out[:, 1:] = labels[:, :-1]
    out[out == IGNORE] = pad
    return out


def random_inputs(config, seed: int, B: int = 3, T: int | None = None, S: int | None = None,
                  num_labels: int | None = None) -> dict[str, np.ndarray]:
    """Token ids, attention masks and labels (int64) for a Gemma 2 or a T5Gemma config.

    Rows cycle through: no padding, right padding, left padding. Real tokens are drawn from
    [3, V), never pad/eos/bos, so `ids != pad` and the attention mask agree (transformers'
    classification pooling reads the ids, not the mask).

    Gemma 2 (`T` tokens, default 7): `labels` are the ids themselves (transformers shifts them
    inside the loss: position t predicts labels[t + 1]), with -100 at padding, at one interior
    token of row 0, and at the first real token of a left-padded row (that token would be
    predicted by the last padding position, a fully masked query row).

    T5Gemma (`S` encoder tokens, default 8; `T` decoder tokens, default 6): `labels` are random
    targets with a -100 *suffix* in right-padded rows. Also returned: `decoder_input_ids` =
    `shift_right(labels)` (what transformers builds from labels) and `decoder_attention_mask`
    = (decoder_input_ids != pad) (transformers' default). A -100 in the *middle* of the labels
    would become a pad decoder input whose own query still has a real label: transformers
    masks that key and drops the embedding gradient of pad tokens (nn.Embedding padding_idx),
    so the cases avoid it.

    With `num_labels`, `labels` are instead class ids of shape (B,) for classification.
    """
    rng = np.random.default_rng(seed)
    if isinstance(config, T5GemmaConfig):
        S, T = S or 8, T or 6
        mask = _padding_mask(rng, B, S)
        ids = np.where(mask == 1, rng.integers(FIRST_ID, config.encoder.vocab_size, (B, S)), PAD)
        out = {"input_ids": ids.astype(np.int64), "attention_mask": mask}
        if num_labels:
            out["labels"] = rng.integers(0, num_labels, B).astype(np.int64)
            return out
        labels = rng.integers(FIRST_ID, config.decoder.vocab_size, (B, T)).astype(np.int64)
        for r in range(B):
            if r % 3 == 1:
                labels[r, T - min(2 + r // 3, T - 2):] = IGNORE
        dec = shift_right(labels, config.decoder.bos_token_id, config.decoder.pad_token_id)
        out.update(labels=labels, decoder_input_ids=dec,
                   decoder_attention_mask=(dec != config.decoder.pad_token_id).astype(np.int64))
        return out
    T = T or 7
    mask = _padding_mask(rng, B, T)
    ids = np.where(mask == 1, rng.integers(FIRST_ID, config.vocab_size, (B, T)), PAD).astype(np.int64)
    out = {"input_ids": ids, "attention_mask": mask}
    if num_labels:
        out["labels"] = rng.integers(0, num_labels, B).astype(np.int64)
        return out
    labels = np.where(mask == 1, ids, IGNORE)
    labels[0, T // 2] = IGNORE
    for r in range(B):
        if mask[r, 0] == 0:                       # left padding
            labels[r, np.argmax(mask[r])] = IGNORE
    out["labels"] = labels
    return out


def valid_positions(mask: np.ndarray) -> np.ndarray:
    """Boolean (B, L): the positions whose outputs are comparable (mask == 1). Outputs at
    padding positions are implementation-defined (a left-padded causal query sees no key)."""
    return np.asarray(mask) != 0


def case_config(case: str):
    for table in (GEMMA2_CASES, T5GEMMA_CASES, GEMMA3_CASES, T5GEMMA2_CASES):
        if case in table:
            return table[case]
    raise KeyError(f"unknown case {case!r}")


def case_params(case: str, num_labels: int | None = None, is_encoder_decoder: bool = True):
    """The parameters of a named case (the same ones the golden files hold)."""
    config = case_config(case)
    shapes = param_shapes(config, num_labels, is_encoder_decoder)
    return random_params(shapes, case_seed(case), std=CASE_STD.get(case, PARAM_STD))


def case_inputs(case: str, num_labels: int | None = None) -> dict[str, np.ndarray]:
    config = case_config(case)
    x = random_inputs(config, case_seed(case) + 1, num_labels=num_labels)
    if isinstance(config, T5GemmaConfig) and config.family == "t5gemma2":
        x = with_eoi_tokens(x, config)
    return x


def with_eoi_tokens(x: dict, config: T5GemmaConfig) -> dict[str, np.ndarray]:
    """T5Gemma 2 inputs with `eoi_token_index` at real positions: twice in the encoder input
    (rows 0 and 2) and twice among the labels (rows 0 and 1), so the decoder reads it as an
    input and the LM head predicts it. Decoder inputs and mask are rebuilt from the labels."""
    eoi, ids, labels = config.eoi_token_index, x["input_ids"].copy(), x["labels"].copy()
    ids[0, 3] = ids[2, -1] = eoi                    # rows 0 (no padding) and 2 (left padding)
    labels[0, 1] = labels[1, 0] = eoi               # -> decoder inputs [0, 2] and [1, 1]
    dec = shift_right(labels, config.decoder.bos_token_id, config.decoder.pad_token_id)
    return {**x, "input_ids": ids, "labels": labels, "decoder_input_ids": dec,
            "decoder_attention_mask": (dec != config.decoder.pad_token_id).astype(np.int64)}


# --------------------------------------------------------------------------- golden files

# file stem -> (kind, case, options). Kinds: "gemma2" (Gemma2ForCausalLM), "t5gemma"
# (T5GemmaForConditionalGeneration), "gemma2_classify", "t5gemma_classify".
GOLDEN: dict[str, tuple[str, str, dict]] = {
    **{f"gemma2_{c}": ("gemma2", c, {}) for c in GEMMA2_CASES},
    **{f"t5gemma_{c}": ("t5gemma", c, {}) for c in T5GEMMA_CASES},
    "cls_gemma2_gqa_odd": ("gemma2_classify", "gqa_odd", {"num_labels": NUM_LABELS}),
    "cls_t5gemma_enc_unbalanced": ("t5gemma_classify", "unbalanced",
                                   {"num_labels": NUM_LABELS, "is_encoder_decoder": False}),
    "cls_t5gemma_encdec_balanced": ("t5gemma_classify", "balanced",
                                    {"num_labels": NUM_LABELS, "is_encoder_decoder": True}),
}


# The Gemma 3 family's golden files (kinds "gemma3": Gemma3ForCausalLM, "t5gemma2":
# T5Gemma2ForConditionalGeneration), kept apart from GOLDEN, which older tests iterate over.
GOLDEN_GEMMA3: dict[str, tuple[str, str, dict]] = {
    **{f"gemma3_{c}": ("gemma3", c, {}) for c in GEMMA3_CASES},
    **{f"t5gemma2_{c}": ("t5gemma2", c, {}) for c in T5GEMMA2_CASES},
}
ALL_GOLDEN = {**GOLDEN, **GOLDEN_GEMMA3}


def golden_case(stem: str):
    """(kind, config, params, inputs, options) of a golden file, regenerated from this module."""
    kind, case, opts = ALL_GOLDEN[stem]
    is_ed = opts.get("is_encoder_decoder", True)
    params = case_params(case, opts.get("num_labels"), is_ed)
    inputs = case_inputs(case, opts.get("num_labels"))
    return kind, case_config(case), params, inputs, opts


def golden_path(stem: str) -> Path:
    return GOLDEN_DIR / f"{stem}.safetensors"


def golden_metadata(stem: str) -> dict:
    from safetensors import safe_open
    with safe_open(str(golden_path(stem)), "numpy") as f:
        return dict(f.metadata())


def load_golden(stem: str):
    """(params, inputs, outputs) of golden file `stem` (a key of ALL_GOLDEN), all numpy.

    outputs has the oracle's keys: "logits", "loss" (a float), "grads" ({name: array}), and
    "encoder_out" (T5Gemma LM files) or "pooled_index" (classification files). Regenerate with
    `python tests/golden/make_golden.py`."""
    from safetensors.numpy import load_file
    path = golden_path(stem)
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; run `python tests/golden/make_golden.py`")
    meta = golden_metadata(stem)
    if meta.get("format_version") != GOLDEN_FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected "
                         f"{GOLDEN_FORMAT_VERSION!r}; run `python tests/golden/make_golden.py`")
    params, inputs, outputs, grads = {}, {}, {}, {}
    for key, value in load_file(str(path)).items():
        if key.startswith("param."):
            params[key[len("param."):]] = value
        elif key.startswith("grad."):
            grads[key[len("grad."):]] = value
        elif key in INPUT_KEYS:
            inputs[key] = value
        else:
            outputs[key] = value
    if "loss" in outputs:
        outputs["loss"] = float(np.asarray(outputs["loss"]).reshape(()))
    outputs["grads"] = grads
    return params, inputs, outputs


def config_json(config) -> str:
    """The config as stored in golden metadata (transformers' config.json fields)."""
    return json.dumps(config.to_hf_dict(), sort_keys=True)
