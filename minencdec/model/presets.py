"""Named model sizes and exact parameter counts.

`PRESETS` holds the paper's sizes (T5Gemma, arXiv 2504.06225, section 4 and its table of
model sizes), the released Gemma 3 text models (and so T5Gemma 2's 270M-270M, 1B-1B and
4B-4B, which pair two of one size), and tiny ones for tests and laptops. `num_parameters`
reproduces the published counts exactly (tests/model/test_presets.py checks them against
transformers' own models built on the meta device).
"""

from __future__ import annotations

from .config import GemmaConfig, T5GemmaConfig, gemma3_config


def _paper(layers, d, ffn, heads, kv, head_dim):
    return GemmaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=ffn,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                       query_pre_attn_scalar=head_dim)


def _gemma3(layers, d, ffn, heads, kv, window, vocab=262_144, max_pos=32_768, **more):
    return gemma3_config(num_hidden_layers=layers, hidden_size=d, intermediate_size=ffn, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=256, sliding_window=window, vocab_size=vocab,
                         max_position_embeddings=max_pos, **more)


PRESETS: dict[str, GemmaConfig] = {
    # The paper's sizes: vocab 256000, window 4096, softcaps 50/30.
    "small": _paper(8, 512, 1024, 8, 8, 64),
    "base": _paper(12, 768, 2048, 12, 12, 64),
    "large": _paper(24, 1024, 2816, 16, 16, 64),
    "xl": _paper(24, 2048, 5120, 32, 32, 64),
    "gemma2-2b": _paper(26, 2304, 9216, 8, 4, 256),
    "gemma2-9b": _paper(42, 3584, 14336, 16, 8, 256),
    # The released Gemma 3 text models (the config.json of each on the Hugging Face hub);
    # T5Gemma 2 270M-270M, 1B-1B and 4B-4B pair two of one size.
    "gemma3-270m": _gemma3(18, 640, 2048, 4, 1, 512),
    "gemma3-1b": _gemma3(26, 1152, 6912, 4, 1, 512),
    "gemma3-4b": _gemma3(34, 2560, 10240, 8, 4, 1024, vocab=262_208, max_pos=131_072, rope_scaling_factor=8.0),
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
    """Trainable parameters; a tied LM head is counted once (with its embedding), and a
    T5Gemma 2's one shared table (and its eoi_embedding) once for the whole model."""
    if isinstance(config, T5GemmaConfig):
        total = _stack_parameters(config.encoder) + _stack_parameters(config.decoder)
        if config.shared_embedding:      # the decoder reads the encoder's table: count it once, plus eoi
            total += config.encoder.hidden_size - config.decoder.vocab_size * config.decoder.hidden_size
        return total
    return _stack_parameters(config)


def _stack_parameters(c: GemmaConfig) -> int:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = c.hidden_size * q + 2 * c.hidden_size * kv + q * c.hidden_size     # q, k, v, o
    attn += 2 * c.head_dim if c.qk_norm else 0                                 # q_norm, k_norm
    mlp = 3 * c.hidden_size * c.intermediate_size                              # gate, up, down
    layer = attn + mlp + 4 * c.hidden_size                                     # four sandwich norms
    if c.is_decoder and c.family == "gemma2":   # T5Gemma's cross-attention (T5Gemma 2 merges it away)
        src = c.cross_attention_hidden_size
        layer += c.hidden_size * q + 2 * src * kv + q * c.hidden_size + 2 * c.hidden_size
    return c.vocab_size * c.hidden_size + c.num_hidden_layers * layer + c.hidden_size
