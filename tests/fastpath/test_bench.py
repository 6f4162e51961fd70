"""The benchmark's FLOP count, against FLOPs counted on the arrays that really pass through.

`fastpath.bench_model.train_flops` turns the Small training step's time into GFLOP/s for the
reference, the fast path and torch alike, so the formula must be right: here it is checked
against the matrix products a forward pass actually makes (test_efficiency's MatmulCounter,
which wraps the reference's linear maps and attention), times 3 for forward + backward.
"""

import numpy as np

from fastpath.bench_model import train_flops
from minencdec import T5GemmaConfig, T5GemmaModel, preset
from helpers import MatmulCounter


def counted_forward_flops(config, B, S, T, monkeypatch):
    model = T5GemmaModel.random(config, seed=0, dtype="float64")
    rng = np.random.default_rng(0)
    counter = MatmulCounter(monkeypatch)
    model.logits(rng.integers(3, config.encoder.vocab_size, (B, S)),
                 rng.integers(3, config.decoder.vocab_size, (B, T)))
    return counter.useful


def test_train_flops_is_three_forward_passes(monkeypatch):
    """Windows longer than the sequences (as for Small at 256 tokens: window 4096), GQA,
    unequal S and T."""
    c = preset("nano", vocab_size=64, sliding_window=64)
    config = T5GemmaConfig(c, c)
    B, S, T = 2, 12, 9
    assert train_flops(config, B, S, T) == 3 * counted_forward_flops(config, B, S, T, monkeypatch)


def test_negative_control_a_window_shorter_than_the_input_breaks_it(monkeypatch):
    """train_flops assumes every pair within the sequence is visible; a window of 4 on 12
    tokens hides pairs, and the count sees it."""
    c = preset("nano", vocab_size=64, sliding_window=4)
    config = T5GemmaConfig(c, c)
    B, S, T = 2, 12, 9
    assert train_flops(config, B, S, T) != 3 * counted_forward_flops(config, B, S, T, monkeypatch)


def hand_counted_step_bytes(config):
    """A decode step's float32 matrices, counted from the config's numbers: per decoder layer
    q, k, v, o (+ T5Gemma's cross q and o; its cross k, v are read once per input), gate, up,
    down; then the LM head's table."""
    d = config.decoder
    q, kv = d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim
    per_layer = 2 * q * d.hidden_size + 2 * kv * d.hidden_size + 3 * d.intermediate_size * d.hidden_size
    if not config.merged_attention:
        per_layer += 2 * q * d.hidden_size
    return 4 * (d.num_hidden_layers * per_layer + d.vocab_size * d.hidden_size)


def test_decoder_step_bytes_against_a_hand_count():
    from fastpath.bench_model import decoder_step_bytes
    from minencdec.model.config import gemma3_config
    t5 = T5GemmaConfig(preset("nano", vocab_size=64), preset("nano", vocab_size=64))
    g3 = gemma3_config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    for config in (t5, T5GemmaConfig(g3, g3)):
        assert decoder_step_bytes(config) == hand_counted_step_bytes(config)
    # negative control: counting T5Gemma's cross-attention k and v (read once per input) differs
    d = t5.decoder
    with_cross_kv = hand_counted_step_bytes(t5) + 4 * d.num_hidden_layers * 2 * d.num_key_value_heads * d.head_dim \
        * d.hidden_size
    assert decoder_step_bytes(t5) != with_cross_kv
