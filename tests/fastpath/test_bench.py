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


def test_generation_split_into_input_and_decode_phases(capsys):
    """_in_process keeps, for each generation function, the input phase and the decode rate
    of its run with the best total (each run records (whole, until the first new token, new
    tokens after it)), and ratios.decode_vs_batch1 from the decode rates: hand-computed here."""
    import pytest
    from fastpath import bench_model as BM

    def fake(phases):
        def run():
            pass
        run.phases = phases
        return run
    batch = fake([(2.2, 0.9, 1016), (2.0, 1.0, 1016)])            # the second run has the best total
    one = fake([(0.6, 0.1, 127)])

    def section(quick, torch, names):
        """A generation section's shape, with runs that do nothing."""
        return {"numba": batch, "numba_batch1": one}, {"numba": 1024, "numba_batch1": 128}, None
    res = BM._in_process(section, True, None, ["numba"], 1, 1, lambda fn: 0, float("nan"))
    assert res["numba"]["input_s"] == 1.0 and res["numba"]["decode_tokens_per_s"] == pytest.approx(1016 / 1.0)
    assert res["numba_batch1"]["decode_tokens_per_s"] == pytest.approx(127 / 0.5)
    assert res["ratios"]["decode_vs_batch1"] == pytest.approx(4.0)
    assert "decode phase (new tokens/s once the input is encoded): 4.00x batch 1" in capsys.readouterr().out
    # negative control: the best input phase of any run (0.9) is not the best run's, which the check tells apart
    assert min(p[1] for p in batch.phases) != res["numba"]["input_s"]
