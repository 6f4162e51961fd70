"""The FLOPs formulas of minencdec.model.efficiency against counts that do not use them.

1. An instrumented `generate`: every linear layer and every attention call of one real run
   (prompt or encoder, cross-attention k/v, every decode step, LM head) is counted from the
   shapes of the arrays it actually multiplies: 2 m n k per matmul ("dense"), and 4 H Dh per
   (query, key) pair its mask lets through ("useful"). Both must equal the formula exactly.
   Negative control: a formula that forgets the sliding window does not.
2. The linear part against config.num_parameters (paper presets): a token through every
   weight matrix costs 2 FLOPs per weight.
3. The visible-pair counts against the library's own masks, summed.
4. The measuring function and the `efficiency` command (plot written, table printed).
"""

from __future__ import annotations

import numpy as np
import pytest

import cases
from helpers import MatmulCounter
from minencdec.model import attention, gemma2, t5gemma
from minencdec.model import efficiency as E
from minencdec.model import generate as G
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import PRESETS, num_parameters

CASES = list(cases.GEMMA2_CASES) + list(cases.T5GEMMA_CASES) + list(cases.GEMMA3_CASES) + list(cases.T5GEMMA2_CASES)
ENC_DEC = set(cases.T5GEMMA_CASES) | set(cases.T5GEMMA2_CASES)
LENGTHS = [(1, 1), (5, 9), (9, 4), (3, 12)]         # input, output: shorter and longer than windows 1-4


def model_of(case):
    cls = t5gemma.T5GemmaModel if case in ENC_DEC else gemma2.Gemma2Model
    return cls(cases.case_config(case), cases.case_params(case), "float64")


@pytest.mark.parametrize("case", CASES)
def test_flops_formula_equals_counted_matmuls(case, monkeypatch):
    model = model_of(case)
    counter = MatmulCounter(monkeypatch)
    for n_in, n_out in LENGTHS:
        counter.dense = counter.useful = 0
        G.generate(model, np.arange(3, 3 + n_in)[None], n_out, eos_token_id=-1)     # exactly n_out tokens
        assert counter.dense == E.flops(model.config, n_in, n_out, "dense").total, (n_in, n_out)
        assert counter.useful == E.flops(model.config, n_in, n_out, "useful").total, (n_in, n_out)


def test_input_part_is_the_prompt_or_encoder_pass(monkeypatch):
    """The split: `start` plus the first LM head is the input part (+ one head)."""
    for case in ("gqa_odd", "unbalanced"):
        model = model_of(case)
        counter = MatmulCounter(monkeypatch)
        G.start(model, np.arange(3, 10)[None])
        f = E.flops(model.config, 7, 1, "dense")
        c = model.config.decoder if case == "unbalanced" else model.config
        head = 2 * c.hidden_size * c.vocab_size
        bos_step = f.output - head if case == "unbalanced" else 0    # T5Gemma's start also feeds bos
        assert counter.dense == f.input + head + bos_step


def test_negative_control_formula_without_window_fails(monkeypatch):
    model = model_of("gqa_odd")
    counter = MatmulCounter(monkeypatch)
    G.generate(model, np.arange(3, 8)[None], 9, eos_token_id=-1)
    no_window = model.config.replace(layer_types=("full_attention",) * model.config.num_hidden_layers)
    assert counter.useful != E.flops(no_window, 5, 9).total
    assert counter.useful == E.flops(model.config, 5, 9).total


def _pair_flops(c, pairs_per_layer):
    return c.num_hidden_layers * pairs_per_layer * 4 * c.num_attention_heads * c.head_dim


@pytest.mark.parametrize("name", ["gemma2-2b", "gemma2-9b", "small", "tiny"])
def test_one_token_costs_two_flops_per_weight(name):
    """Decoder-only, one input token and one generated token: every weight matrix is used once
    (the embedding table as the LM head), plus one attention pair per layer."""
    c = PRESETS[name]
    norms = c.num_hidden_layers * 4 * c.hidden_size + c.hidden_size
    assert E.flops(c, 1, 1).total == 2 * (num_parameters(c) - norms) + _pair_flops(c, 1)


@pytest.mark.parametrize("pair", [("gemma2-9b", "gemma2-2b"), ("gemma2-2b", "gemma2-2b"), ("base", "small")])
def test_encoder_decoder_one_token_costs_two_flops_per_weight(pair):
    """One source token, one generated token: every matrix once (the encoder's table is only a
    lookup, the decoder's doubles as the head); attention: one pair per encoder layer, and per
    decoder layer one self pair and one cross pair."""
    enc, dec = PRESETS[pair[0]], PRESETS[pair[1]]
    cfg = T5GemmaConfig(enc, dec)
    norms = (enc.num_hidden_layers * 4 + 1) * enc.hidden_size + (dec.num_hidden_layers * 6 + 1) * dec.hidden_size
    matrices = num_parameters(cfg) - norms - enc.vocab_size * enc.hidden_size
    assert E.flops(cfg, 1, 1).total == 2 * matrices + _pair_flops(cfg.encoder, 1) + _pair_flops(cfg.decoder, 2)


def test_visible_pair_counts_equal_mask_sums():
    for n in (1, 2, 5, 9, 17):
        for w in (None, 1, 2, 3, 8, 40):
            for rule in ("le", "lt", "t5gemma2"):
                want = int(attention.bidirectional_mask(n, w, rule).sum())
                assert E.bidirectional_pairs(n, w, rule) == want, (n, w, rule)
            for first in (0, 3):
                want = int(attention.causal_mask(n, w, offset=first)[:, :first + n].sum())
                assert E.causal_pairs(first, n, w) == want, (first, n, w)


def test_classifier_flops_are_one_pass_of_the_reading_stack(monkeypatch):
    """An encoder-decoder classifies with its encoder alone; a decoder-only model with one
    causal pass: counted on the arrays a Classifier's stack really multiplies (the head's
    product runs in classify.py, which the counter does not wrap: left out on both sides)."""
    from minencdec.model.classify import Classifier
    for case in ("unequal_depth", "gqa_mixed", "balanced"):
        model = model_of(case)
        clf = Classifier.from_model(model, 3)
        counter = MatmulCounter(monkeypatch)
        clf.logits(np.arange(3, 12)[None])
        assert counter.useful == E.classifier_flops(model.config, 9), case


def test_paper_scale_story():
    """At paper scale, 9B-2B's generated tokens cost what 2B-2B's do (same decoder), and its
    extra cost is all in the input part; dense never counts less than useful."""
    m = E.paper_models()
    a, b = E.flops(m["T5Gemma 9B-2B"], 512, 128), E.flops(m["T5Gemma 2B-2B"], 512, 128)
    assert a.output == b.output and a.input > 3 * b.input
    for cfg in m.values():
        assert E.flops(cfg, 8192, 16, "dense").total >= E.flops(cfg, 8192, 16).total


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        E.flops(PRESETS["tiny"], 4, 4, "sparse")
    with pytest.raises(ValueError, match=">= 1"):
        E.flops(PRESETS["tiny"], 0, 4)


def test_measure_returns_positive_times():
    model = E.random_model(PRESETS["nano"])
    inp, per_step = E.measure(model, 8, 3, repeats=1)
    assert 0 < inp < 10 and 0 < per_step < 10


def test_efficiency_command_writes_plot_and_table(tmp_path, capsys, monkeypatch):
    from minencdec.cli import build_parser
    from minencdec.cli import efficiency as command
    nano = PRESETS["nano"]                                  # time nano models: the plot, not speed, is tested
    monkeypatch.setattr(command, "tiny_models", lambda: {
        "decoder-only small": nano, "decoder-only large": nano.replace(num_hidden_layers=4),
        "enc-dec small-small": T5GemmaConfig(nano, nano),
        "enc-dec large-small": T5GemmaConfig(nano.replace(num_hidden_layers=4), nano)})
    args = build_parser().parse_args(["efficiency", "--out", str(tmp_path), "--quick", "--repeats", "1"])
    assert args.func(args) == 0
    png = tmp_path / "efficiency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    out = capsys.readouterr().out
    assert "T5Gemma 9B-2B" in out and "enc-dec large-small" in out and "tok/s" in out
