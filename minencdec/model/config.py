"""Model configurations: one frozen dataclass per stack, mirroring Hugging Face's fields.

`GemmaConfig` describes one Gemma 2 stack: the decoder-only model (`Gemma2Config` in
transformers), or the encoder or the decoder of a T5Gemma model (`T5GemmaModuleConfig`).
`T5GemmaConfig` pairs an encoder and a decoder. Field names are the Hugging Face ones, so
`config.json` maps onto them one to one (`to_hf_dict` / `from_hf_dict`).

`PRESETS` holds the paper's sizes (REFERENCE.md section 5) and tiny ones for tests and
laptops; `num_parameters` reproduces the paper's parameter counts exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SLIDING, FULL = "sliding_attention", "full_attention"

# Fields every config.json must carry: without them the architecture is ambiguous.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class GemmaConfig:
    """One Gemma 2 stack (decoder-only model, T5Gemma encoder or T5Gemma decoder)."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: tuple[str, ...] = ()          # () -> sliding on even layers, full on odd
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    # T5Gemma only. The decoder's cross-attention reads this width (the encoder's).
    is_decoder: bool = False
    cross_attention_hidden_size: int | None = None
    # Encoder sliding layers: key j visible to query i iff |i - j| <= w ("le", transformers
    # >= 5) or |i - j| < w ("lt", transformers 4.53-4.57 and the JAX code). Not a HF field.
    bidirectional_window: str = "le"

    def __post_init__(self):
        if not self.layer_types:
            types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", types)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in _REQUIRED + ("query_pre_attn_scalar",):
            value = getattr(self, name)
            if not value or value < 0:
                raise ValueError(f"config field {name!r} must be positive, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise ValueError(f"unknown layer_types {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported "
                             "(Gemma 2 uses gelu_pytorch_tanh)")
        if self.bidirectional_window not in ("le", "lt"):
            raise ValueError("bidirectional_window must be 'le' or 'lt'")

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for a full-attention layer."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def replace(self, **changes) -> "GemmaConfig":
        """A copy with some fields changed. A new depth without new layer_types gets the
        default alternating pattern rather than the old depth's list."""
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, model_type: str = "gemma2") -> dict:
        """The config.json fields transformers reads (Gemma2Config / T5GemmaModuleConfig)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["layer_types"] = list(self.layer_types)
        del d["bidirectional_window"]
        if model_type == "gemma2":
            del d["is_decoder"], d["cross_attention_hidden_size"]
        elif d["cross_attention_hidden_size"] is None:
            del d["cross_attention_hidden_size"]
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta. Write both.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.update(model_type=model_type, tie_word_embeddings=True, attention_bias=False,
                 attention_dropout=0.0)
        if model_type == "gemma2":
            d["architectures"] = ["Gemma2ForCausalLM"]
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GemmaConfig":
        """Read a Gemma2Config / T5GemmaModuleConfig dict; `source` names it in errors."""
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"{source}: missing config fields {missing}")
        if d.get("attention_bias"):
            raise ValueError(f"{source}: attention_bias=true is not Gemma 2 and is not supported")
        if d.get("tie_word_embeddings") is False:
            raise ValueError(f"{source}: untied word embeddings are not supported (Gemma 2 ties them)")
        known = {f.name for f in dataclasses.fields(cls)}
        nullable = {"sliding_window", "attn_logit_softcapping", "final_logit_softcapping"}
        kwargs = {k: v for k, v in d.items() if k in known and (v is not None or k in nullable)}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_type {rope['rope_type']!r} is not supported")
        for k in ("eos_token_id",):   # transformers allows a list; the first is the stop token
            if isinstance(kwargs.get(k), list):
                kwargs[k] = kwargs[k][0]
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


@dataclass(frozen=True)
class T5GemmaConfig:
    """An encoder-decoder pair. Widths, depths and heads may differ (e.g. 9B-2B)."""

    encoder: GemmaConfig
    decoder: GemmaConfig

    def __post_init__(self):
        enc = self.encoder.replace(is_decoder=False, cross_attention_hidden_size=None)
        dec = self.decoder.replace(is_decoder=True, cross_attention_hidden_size=self.encoder.hidden_size)
        object.__setattr__(self, "encoder", enc)
        object.__setattr__(self, "decoder", dec)
        if enc.vocab_size != dec.vocab_size:
            raise ValueError(f"encoder vocab_size {enc.vocab_size} != decoder vocab_size {dec.vocab_size}")

    def to_hf_dict(self) -> dict:
        dec = self.decoder
        return {"model_type": "t5gemma", "architectures": ["T5GemmaForConditionalGeneration"],
                "encoder": self.encoder.to_hf_dict("t5_gemma_module"),
                "decoder": dec.to_hf_dict("t5_gemma_module"),
                "is_encoder_decoder": True, "tie_word_embeddings": True,
                "vocab_size": dec.vocab_size, "pad_token_id": dec.pad_token_id,
                "eos_token_id": dec.eos_token_id, "bos_token_id": dec.bos_token_id,
                "dropout_rate": 0.0, "attention_dropout": 0.0, "classifier_dropout_rate": 0.0}

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "T5GemmaConfig":
        for part in ("encoder", "decoder"):
            if not isinstance(d.get(part), dict):
                raise ValueError(f"{source}: a T5Gemma config needs an {part!r} sub-config")
        return cls(GemmaConfig.from_hf_dict(d["encoder"], f"{source} [encoder]"),
                   GemmaConfig.from_hf_dict(d["decoder"], f"{source} [decoder]"))


def _paper(layers, d, ffn, heads, kv, head_dim):
    return GemmaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=ffn,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       query_pre_attn_scalar=head_dim)


# The paper's sizes (REFERENCE.md section 5), vocab 256000, window 4096, softcaps 50/30.
PRESETS: dict[str, GemmaConfig] = {
    "small": _paper(8, 512, 1024, 8, 8, 64),
    "base": _paper(12, 768, 2048, 12, 12, 64),
    "large": _paper(24, 1024, 2816, 16, 16, 64),
    "xl": _paper(24, 2048, 5120, 32, 32, 64),
    "gemma2-2b": _paper(26, 2304, 9216, 8, 4, 256),
    "gemma2-9b": _paper(42, 3584, 14336, 16, 8, 256),
    # Laptop- and test-sized: a small vocabulary (a trained sentencepiece model) and a short
    # window so that sliding layers matter on short sequences.
    "tiny": GemmaConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        query_pre_attn_scalar=32, sliding_window=64),
    "nano": GemmaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        query_pre_attn_scalar=16, sliding_window=4),
}


def preset(name: str, **changes) -> GemmaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)


def num_parameters(config: GemmaConfig | T5GemmaConfig) -> int:
    """Trainable parameters; the tied LM head is counted once (with the embedding)."""
    if isinstance(config, T5GemmaConfig):
        return _stack_parameters(config.encoder) + _stack_parameters(config.decoder)
    return _stack_parameters(config)


def _stack_parameters(c: GemmaConfig) -> int:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size     # q, k, v, o
    mlp = 3 * c.hidden_size * c.intermediate_size                              # gate, up, down
    layer = attn + mlp + 4 * c.hidden_size                                     # four sandwich norms
    if c.is_decoder:
        src = c.cross_attention_hidden_size
        layer += c.hidden_size * q + 2 * src * kv + q * c.hidden_size + 2 * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size
