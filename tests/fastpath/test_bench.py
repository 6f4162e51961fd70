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
