"""Model configurations: one frozen dataclass per stack, mirroring Hugging Face's fields.

`GemmaConfig` describes one stack: a decoder-only model (`Gemma2Config`, `Gemma3TextConfig`
in transformers) or the encoder or decoder of an encoder-decoder (`T5GemmaModuleConfig`,
`T5Gemma2TextConfig`). `T5GemmaConfig` pairs an encoder and a decoder. Field names are the
Hugging Face ones; hf_config.py maps `config.json` onto them and back.

Two families share one stack: a second family is options of it, not a copy. What a Gemma 3
stack does differently from a Gemma 2 one is said here, by `family`:

    qk_norm              RMSNorm (1 + w) over head_dim on each query and key, before RoPE
    rope_theta_of(i)     full layers use rope_theta, sliding layers rope_local_base_freq
    (layer pattern)      the default layer_types: five sliding layers, then one full
    (softcaps)           none by default (`gemma3_config` sets them to None)

and a pair of Gemma 3 stacks is a T5Gemma 2 (`T5GemmaConfig.family`): merged attention in
the decoder, one embedding table for encoder, decoder and LM head, and `eoi_embedding`.

The named sizes and the parameter counts are in presets.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

SLIDING, FULL = "sliding_attention", "full_attention"
FAMILIES = ("gemma2", "gemma3")
WINDOW_RULES = ("le", "lt", "t5gemma2")
# The encoder's window rule in an encoder-decoder's config.json, written only when it is not
# the family's own (transformers ignores the field and applies "le" to T5Gemma, "t5gemma2" to
# T5Gemma 2: a checkpoint without it means what transformers does).
WINDOW_FIELD = "minencdec_bidirectional_window"
# An encoder that keeps the causal mask (the causal-encoder ablation), in an encoder-decoder's
# config.json: written only when true. transformers ignores the field and would run the
# encoder bidirectionally, so such a checkpoint is minencdec's to run.
CAUSAL_ENCODER_FIELD = "minencdec_causal_encoder"
# The smallest SigLIP vision tower transformers builds for a T5Gemma 2 (see T5GemmaConfig.to_hf_dict).
TINY_VISION = {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14}

# Fields every config.json must carry: without them the architecture is ambiguous.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")
# Sizes: positive integers. Token ids: integers inside the vocabulary.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")
_TOKEN_IDS = ("pad_token_id", "eos_token_id", "bos_token_id")
# Positive finite reals; the optional ones may be None (off, or: the family's default).
_POSITIVE = ("query_pre_attn_scalar", "rms_norm_eps", "rope_theta", "rope_scaling_factor")
_OPTIONAL_POSITIVE = ("attn_logit_softcapping", "final_logit_softcapping", "rope_local_base_freq")


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma 2 or Gemma 3 stack (decoder-only model, encoder or decoder)."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()          # () -> the family's default pattern
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0                # RoPE base of full layers (of every layer in Gemma 2)
    max_position_embeddings: int = 8192
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    family: str = "gemma2"                     # "gemma2" or "gemma3": see the module docstring
    rope_local_base_freq: float | None = None  # RoPE base of sliding layers; None: rope_theta
    rope_scaling_factor: float = 1.0           # linear RoPE scaling of full layers (Gemma 3 4B: 8)
    # Encoder-decoder only. The decoder's cross-attention reads this width (the encoder's).
    is_decoder: bool = False
    cross_attention_hidden_size: int | None = None
    # Encoder sliding layers (not a Hugging Face field): key j is visible to query i iff
    #   "le":  |i - j| <= w          T5Gemma in transformers >= 5
    #   "lt":  |i - j| <  w          T5Gemma in transformers 4.53-4.57 and the JAX code
    #   "t5gemma2":  -((w - 1) // 2) <= j - i <= w // 2    T5Gemma 2 (w keys in all)
    # None: the family's rule ("le" for Gemma 2 stacks, "t5gemma2" for Gemma 3 stacks).
    # An encoder-decoder's config.json stores another rule as WINDOW_FIELD.
    bidirectional_window: str | None = None
    # Encoder only, an ablation (paper: a causal encoder scores about 4 points lower): True
    # keeps the causal mask of the decoder-only source in the encoder (t5gemma.encoder_masks).
    # Not a Hugging Face field: config.json stores it as CAUSAL_ENCODER_FIELD.
    causal_encoder: bool = False

    def __post_init__(self):
        _check_types(self)
        if self.family not in FAMILIES:
            raise ValueError(f"config field 'family' must be one of {FAMILIES}, got {self.family!r}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.family, self.num_hidden_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.bidirectional_window is None:
            object.__setattr__(self, "bidirectional_window", _default_rule(self.family))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"unknown layer_types {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported "
                             "(Gemma uses gelu_pytorch_tanh)")
        if self.bidirectional_window not in WINDOW_RULES:
            raise ValueError(f"bidirectional_window must be one of {WINDOW_RULES}, got {self.bidirectional_window!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.family == "gemma3" and self.attn_logit_softcapping is not None:
            raise ValueError("attn_logit_softcapping must be null for Gemma 3: transformers' Gemma 3 and "
                             "T5Gemma 2 read the field but never apply it, so a value would be silently ignored")
        if self.family == "gemma2" and (self.rope_local_base_freq is not None or self.rope_scaling_factor != 1.0):
            raise ValueError("rope_local_base_freq and rope_scaling_factor are Gemma 3 fields; a Gemma 2 "
                             "stack uses rope_theta on every layer")

    @property
    def qk_norm(self) -> bool:
        """Gemma 3: RMSNorm over head_dim on queries and keys (self_attn.q_norm / k_norm)."""
        return self.family == "gemma3"

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def rope_of_type(self, layer_type: str) -> tuple[float, float]:
        """(base theta, linear scale) of RoPE on layers of a type: Gemma 3 gives sliding layers
        their own base, and only full layers may be scaled (positions divided by the scale)."""
        if layer_type == SLIDING:
            return (self.rope_theta if self.rope_local_base_freq is None else self.rope_local_base_freq), 1.0
        return self.rope_theta, self.rope_scaling_factor

    def replace(self, **changes) -> "GemmaConfig":
        """A copy with some fields changed. A new depth without new layer_types gets the
        family's default pattern rather than the old depth's list."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)


    # ------------------------------------------------------------------ config.json

    def to_hf_dict(self, model_type: str | None = None) -> dict:
        """The config.json fields transformers reads: Gemma2Config / Gemma3TextConfig (model_type
        None: the family's decoder-only type) or a T5Gemma / T5Gemma 2 module's."""
        model_type = model_type or ("gemma3_text" if self.family == "gemma3" else "gemma2")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layer_types"] = list(self.layer_types)
        for ours in ("bidirectional_window", "family", "rope_local_base_freq", "rope_scaling_factor",
                     "causal_encoder"):
            del d[ours]
        if model_type in ("gemma2", "gemma3_text") or self.family == "gemma3":
            del d["is_decoder"], d["cross_attention_hidden_size"]
        elif d["cross_attention_hidden_size"] is None:
            del d["cross_attention_hidden_size"]
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.family == "gemma3":               # one RoPE per layer type (transformers >= 5)
            if self.rope_scaling_factor != 1.0:
                full.update(rope_type="linear", factor=self.rope_scaling_factor)
            local = self.rope_of_type(SLIDING)[0]
            d["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": local}}
            d["rope_local_base_freq"] = local     # what transformers 4.x reads
        else:
            d["rope_parameters"] = full           # transformers >= 5; 4.x reads rope_theta: both written
        d.update(model_type=model_type, tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0)
        if model_type in ("gemma2", "gemma3_text"):
            d["architectures"] = ["Gemma2ForCausalLM" if model_type == "gemma2" else "Gemma3ForCausalLM"]
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", family: str = "gemma2") -> "GemmaConfig":
        """Read a Gemma2Config / Gemma3TextConfig / T5Gemma(2) module dict (`family` says which
        defaults apply to fields it leaves out); `source` names it in errors."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing config fields {missing}")
        if d.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not Gemma and is not supported")
        if d.get("tie_word_embeddings") is False:
            raise ValueError(f"{source}: tie_word_embeddings=false (an LM head of its own) is not supported: "
                             "Gemma ties the head to the embedding")
        known = {f.name for f in dataclasses.fields(cls)} - {"family", "bidirectional_window", "rope_scaling_factor",
                                                             "causal_encoder"}
        nullable = {"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"}
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in nullable)}
        if isinstance(kwargs.get("eos_token_id"), list) and kwargs["eos_token_id"]:
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]   # transformers allows a list; the first stops
        if isinstance(kwargs.get("layer_types"), list):
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        kwargs.update(_rope_fields(d, source, family))
        try:
            return (gemma3_config if family == "gemma3" else cls)(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


def _rope_fields(d: dict, source: str, family: str) -> dict:
    """rope_theta / rope_local_base_freq / rope_scaling_factor from a config dict, written by
    transformers >= 5 (`rope_parameters`: one dict, or one per layer type for Gemma 3) or by
    4.x (`rope_theta`, Gemma 3's `rope_local_base_freq`, `rope_scaling`). Only the default
    RoPE is supported, and Gemma 3's linear scaling of its full layers."""
    def kind(params, where, linear_ok):
        if not isinstance(params, dict):
            raise ValueError(f"{source}: {where} must be an object, got {type(params).__name__}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "linear" and linear_ok:
            return float(params.get("factor", 1.0))
        if rope_type != "default":
            raise ValueError(f"{source}: {where} has rope_type {rope_type!r}; only 'default' RoPE"
                             + (" and Gemma 3's 'linear' scaling of full layers are" if family == "gemma3" else " is")
                             + " supported")
        return 1.0

    out = {}
    if d.get("rope_theta") is not None:
        out["rope_theta"] = d["rope_theta"]
    if family == "gemma3" and d.get("rope_local_base_freq") is not None:
        out["rope_local_base_freq"] = d["rope_local_base_freq"]
    if d.get("rope_scaling") is not None:                         # transformers 4.x
        out["rope_scaling_factor"] = kind(d["rope_scaling"], "rope_scaling", family == "gemma3")
    params = d.get("rope_parameters")
    if params is None:
        return out
    if not isinstance(params, dict):
        raise ValueError(f"{source}: rope_parameters must be an object, got {type(params).__name__}")
    if family == "gemma3" and (FULL in params or SLIDING in params):
        for layer_type, theta_field in ((FULL, "rope_theta"), (SLIDING, "rope_local_base_freq")):
            p = params.get(layer_type) or {}
            factor = kind(p, f"rope_parameters[{layer_type!r}]", layer_type == FULL)
            if layer_type == FULL:
                out["rope_scaling_factor"] = factor
            if p.get("rope_theta") is not None:
                out[theta_field] = p["rope_theta"]
        return out
    kind(params, "rope_parameters", False)
    if params.get("rope_theta") is not None:
        out["rope_theta"] = params["rope_theta"]
    return out


def _default_rule(family: str) -> str:
    """The encoder window rule a family's stacks get when the config names none."""
    return "t5gemma2" if family == "gemma3" else "le"


def default_layer_types(family: str, n: int) -> tuple[str, ...]:
    """Gemma 2: sliding on even layers, full on odd. Gemma 3: every sixth layer full."""
    if family == "gemma3":
        return tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n))
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(n))


def gemma3_config(**fields) -> GemmaConfig:
    """A Gemma 3 stack with transformers' Gemma3TextConfig defaults (no softcaps, RoPE bases
    1e6 full / 1e4 sliding); `fields` override them."""
    base = dict(family="gemma3", attn_logit_softcapping=None, final_logit_softcapping=None,
                rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                max_position_embeddings=131_072)
    return GemmaConfig(**{**base, **fields})


def _check_types(c: GemmaConfig):
    """Every number of the config is of the right kind and range, named when it is not
    (a config.json may hold "128", 32.0, NaN or a negative window)."""
    def fail(name, value, want):
        raise ValueError(f"config field {name!r} must be {want}, got {value!r} ({type(value).__name__})")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name in _SIZES:
        v = getattr(c, name)
        if not is_int(v) or v <= 0:
            fail(name, v, "a positive integer")
    if c.sliding_window is not None and (not is_int(c.sliding_window) or c.sliding_window <= 0):
        fail("sliding_window", c.sliding_window, "a positive integer or null")
    for name in _TOKEN_IDS:
        v = getattr(c, name)
        if not is_int(v) or not 0 <= v < c.vocab_size:
            fail(name, v, f"a token id in [0, vocab_size = {c.vocab_size})")
    for name in _POSITIVE + _OPTIONAL_POSITIVE:
        v = getattr(c, name)
        if v is None and name in _OPTIONAL_POSITIVE:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            fail(name, v, "a positive finite number" + (" or null" if name in _OPTIONAL_POSITIVE else ""))
    if c.cross_attention_hidden_size is not None and (not is_int(c.cross_attention_hidden_size)
                                                      or c.cross_attention_hidden_size <= 0):
        fail("cross_attention_hidden_size", c.cross_attention_hidden_size, "a positive integer or null")
    if not isinstance(c.causal_encoder, bool):
        fail("causal_encoder", c.causal_encoder, "true or false")


@dataclass(frozen=True)
class T5GemmaConfig:
    """An encoder-decoder pair: T5Gemma (two Gemma 2 stacks; widths, depths and heads may
    differ, e.g. 9B-2B) or T5Gemma 2 (two Gemma 3 stacks of one width; depths may differ)."""

    encoder: GemmaConfig
    decoder: GemmaConfig
    eoi_token_index: int | None = None   # T5Gemma 2: the token whose embedding is eoi_embedding

    def __post_init__(self):
        enc = self.encoder.replace(is_decoder=False, cross_attention_hidden_size=None)
        dec = self.decoder.replace(is_decoder=True, cross_attention_hidden_size=self.encoder.hidden_size,
                                   causal_encoder=False)                   # a decoder is causal anyway
        object.__setattr__(self, "encoder", enc)
        object.__setattr__(self, "decoder", dec)
        if enc.vocab_size != dec.vocab_size:
            raise ValueError(f"encoder vocab_size {enc.vocab_size} != decoder vocab_size {dec.vocab_size}")
        if enc.family != dec.family:
            raise ValueError(f"encoder ({enc.family}) and decoder ({dec.family}) must be of one family")
        if self.family == "t5gemma2":
            if self.eoi_token_index is None:
                object.__setattr__(self, "eoi_token_index", 256_000)
            if not isinstance(self.eoi_token_index, int) or isinstance(self.eoi_token_index, bool) \
                    or self.eoi_token_index < 0:
                raise ValueError(f"eoi_token_index must be a non-negative integer, got {self.eoi_token_index!r}")
            if enc.hidden_size != dec.hidden_size:
                raise ValueError(f"T5Gemma 2's merged attention projects the encoder output with the decoder's "
                                 f"k/v, so the widths must be equal: {enc.hidden_size} vs {dec.hidden_size}")
        elif self.eoi_token_index is not None:
            raise ValueError("eoi_token_index is a T5Gemma 2 field (Gemma 3 stacks)")

    def to_hf_dict(self) -> dict:
        """config.json of T5GemmaForConditionalGeneration or T5Gemma2ForConditionalGeneration."""
        enc, dec = self.encoder, self.decoder
        top = {"is_encoder_decoder": True, "tie_word_embeddings": True, "vocab_size": dec.vocab_size,
               "pad_token_id": dec.pad_token_id, "eos_token_id": dec.eos_token_id, "bos_token_id": dec.bos_token_id,
               "dropout_rate": 0.0, "attention_dropout": 0.0, "classifier_dropout_rate": 0.0}
        if enc.bidirectional_window != _default_rule(enc.family):
            top[WINDOW_FIELD] = enc.bidirectional_window     # minencdec's own; transformers ignores it
        if enc.causal_encoder:
            top[CAUSAL_ENCODER_FIELD] = True                 # the same: transformers cannot run it
        if self.family == "t5gemma":
            return {"model_type": "t5gemma", "architectures": ["T5GemmaForConditionalGeneration"],
                    "encoder": enc.to_hf_dict("t5_gemma_module"), "decoder": dec.to_hf_dict("t5_gemma_module"), **top}
        # T5Gemma 2's encoder config wraps the text stack beside a vision tower. minencdec is
        # text-only: it declares the smallest SigLIP transformers builds (its weights are not
        # written; transformers initialises them at random and never uses them for text).
        eoi = self.eoi_token_index
        encoder = {"model_type": "t5gemma2_encoder", "text_config": enc.to_hf_dict("t5gemma2_text"),
                   "vision_config": dict(TINY_VISION), "mm_tokens_per_image": 4,
                   "boi_token_index": eoi - 1, "eoi_token_index": eoi, "image_token_index": eoi + 1}
        return {"model_type": "t5gemma2", "architectures": ["T5Gemma2ForConditionalGeneration"],
                "encoder": encoder, "decoder": dec.to_hf_dict("t5gemma2_decoder"),
                "eoi_token_index": eoi, "image_token_index": eoi + 1, **top}

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "T5GemmaConfig":
        """Read a T5Gemma or T5Gemma 2 config dict (by its model_type)."""
        for part in ("encoder", "decoder"):
            if not isinstance(d.get(part), dict):
                raise ValueError(f"{source}: an encoder-decoder config needs an {part!r} sub-config")
        if d.get("tie_word_embeddings") is False:
            raise ValueError(f"{source}: tie_word_embeddings=false (an LM head of its own) is not supported: "
                             "the head is tied to the (decoder's) embedding")
        rule = d.get(WINDOW_FIELD)
        if rule is not None and rule not in WINDOW_RULES:
            raise ValueError(f"{source}: {WINDOW_FIELD} must be one of {WINDOW_RULES}, got {rule!r}")
        causal = False if d.get(CAUSAL_ENCODER_FIELD) is None else d[CAUSAL_ENCODER_FIELD]
        if not isinstance(causal, bool):
            raise ValueError(f"{source}: {CAUSAL_ENCODER_FIELD} must be true or false, got {causal!r}")
        if d.get("model_type") != "t5gemma2":
            return cls(GemmaConfig.from_hf_dict(d["encoder"], f"{source} [encoder]")
                       .replace(bidirectional_window=rule, causal_encoder=causal),
                       GemmaConfig.from_hf_dict(d["decoder"], f"{source} [decoder]"))
        text = d["encoder"].get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{source}: a T5Gemma 2 encoder config needs a 'text_config' object")
        eoi = d.get("eoi_token_index", d["encoder"].get("eoi_token_index"))
        try:
            return cls(GemmaConfig.from_hf_dict(text, f"{source} [encoder.text_config]", "gemma3")
                       .replace(bidirectional_window=rule, causal_encoder=causal),
                       GemmaConfig.from_hf_dict(d["decoder"], f"{source} [decoder]", "gemma3"),
                       eoi_token_index=256_000 if eoi is None else eoi)
        except ValueError as e:
            raise ValueError(e if str(e).startswith(source) else f"{source}: {e}") from None

    @property
    def family(self) -> str:
        """"t5gemma" (Gemma 2 stacks) or "t5gemma2" (Gemma 3 stacks)."""
        return "t5gemma2" if self.encoder.family == "gemma3" else "t5gemma"

    @property
    def merged_attention(self) -> bool:
        """T5Gemma 2: each decoder layer attends over its own keys and the encoder's in one
        softmax, with one set of q/k/v/o (no separate cross-attention sublayer)."""
        return self.family == "t5gemma2"

    @property
    def shared_embedding(self) -> bool:
        """T5Gemma 2: one table for the encoder's input, the decoder's input and the LM head."""
        return self.family == "t5gemma2"
