"""The demo's harness end to end on tiny models, and its data handling.

Oracles: the drug-review reader against the rows of a .tsv written here (labels, HTML
entities, quotes); splits are disjoint (check_disjoint's negative control: a planted
duplicate is caught); the next-line split holds whole plays apart; the pipeline's copy check
is 0.0 (adaptation is a pure copy) while its negative control (a model that is not the
source) is not; the report holds every number of results.json it claims.
"""

import json
import random

import numpy as np
import pytest

from minencdec.experiments import datasets as D
from minencdec.experiments import pipeline
from minencdec.experiments.report import write_report
from minencdec.io.tokenizer import train_tokenizer
from minencdec.model.config import gemma3_config
from minencdec.model.gemma2 import Gemma2Model

WORDS = ("thou art the king and i the fool who speaks of love war night day sword crown "
         "good bad fine great awful pill pain sleep better worse").split()


def play(seed, lines=60):
    r = random.Random(seed)
    return "\n".join(("KING." if i % 7 == 0 else " ".join(r.choice(WORDS) for _ in range(r.randint(4, 9))))
                     for i in range(lines))


def review_rows(n, seed):
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("negative", "neutral", "positive")[i % 3]
        word = {"negative": "awful", "neutral": "fine", "positive": "great"}[label]
        rows.append({"text": f"this pill is {word} " + " ".join(r.choice(WORDS) for _ in range(6)) + f" #{i}",
                     "label": ("negative", "neutral", "positive").index(label)})
    return rows


def test_read_reviews_from_a_tsv(tmp_path):
    path = tmp_path / "r.tsv"
    path.write_text('\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n'
                    '1\tX\tY\t"""I&#039;m  fine, really."""\tneutral\tJune 1, 2010\t3\n'
                    '2\tX\tY\t"""Great &amp; good"""\tpositive\tJune 2, 2010\t5\n', encoding="utf-8")
    assert D.read_reviews(path) == [{"text": "I'm fine, really.", "label": 1}, {"text": "Great & good", "label": 2}]
    path.write_text('\tdrugName\tcondition\treview\trating\n1\tX\tY\t"ok"\tbrilliant\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected a review and a rating"):
        D.read_reviews(path)


def test_splits_are_disjoint_and_hold_plays_apart():
    texts = [play(i) for i in range(10)]
    train, val, test = D.next_lines(texts, seed=3)
    plays = [{e["play"] for e in s} for s in (train, val, test)]
    assert plays[0] and plays[1] and plays[2] and not (plays[0] & plays[1] or plays[0] & plays[2] or plays[1] & plays[2])
    D.check_disjoint(train, val, test)
    with pytest.raises(ValueError, match="in splits 0 and 2"):
        D.check_disjoint(train, val, test + [train[0]])               # negative control: a planted duplicate
    assert all("KING." not in e["input"] for e in train)              # speakers are not lines


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    texts = [play(i) for i in range(8)]
    tok = train_tokenizer(texts + [r["text"] for r in review_rows(60, 0)], 400, num_sentinels=4, seed=0)
    config = gemma3_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           max_position_embeddings=256)
    Gemma2Model.random(config, seed=1).save_pretrained(root / "source")
    tok.save(root / "source")
    reviews = (review_rows(48, 1), review_rows(12, 2), review_rows(24, 3))
    corpora = D.demo_corpora(texts, reviews, seed=0)
    budget = pipeline.Budget(train_steps=3, train_batch=2, train_len=48, cls_steps=3, cls_batch=4, cls_len=24,
                             gen_examples=4, gen_new_tokens=4, timing_examples=2)
    results = pipeline.run(root / "run", root / "source", corpora, budget, backend="numpy", log=lambda *a: None)
    return root, results


def test_pipeline_copy_check_and_results(tiny_run):
    root, results = tiny_run
    assert results["copy_check"]["max_abs_difference"] == 0.0
    for name in ("gemma3", "t5gemma2"):
        acc, lo, hi = results["classification"][name]["accuracy"]
        assert 0 <= lo <= acc <= hi <= 1
        assert results["cost"][name]["classification_flops"] > 0
    # one stack either way (the encoder alone reads a review): the same matrices, and a few more
    # attention pairs for the encoder's bidirectional attention
    ratio = results["cost"]["t5gemma2"]["classification_flops"] / results["cost"]["gemma3"]["classification_flops"]
    assert 1.0 <= ratio < 1.1
    # negative control for the copy check: the trained decoder-only model is no longer the source
    from minencdec.io.vocab import load_tokenizer
    check = pipeline.copy_check(root / "run" / "train-gemma3" / "checkpoint", root / "run" / "t5gemma2",
                                load_tokenizer(root / "run" / "gemma3"), play(0))
    assert check["max_abs_difference"] > 0


def test_report_holds_the_results(tiny_run):
    root, results = tiny_run
    report = write_report(root / "run").read_text()
    acc = results["classification"]["t5gemma2"]["accuracy"]
    assert f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" in report
    assert "0.0e+00" in report                                        # the copy check
    for png in ("quality_vs_cost.png", "training.png"):
        assert (root / "run" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((root / "run" / "results.json").read_text())["budget"]["train_steps"] == 3


def test_a_finished_pipeline_is_not_run_again(tiny_run, monkeypatch):
    root, _ = tiny_run
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: pytest.fail("a finished step ran again"))
    monkeypatch.setattr(pipeline, "trim_vocab", lambda *a, **k: pytest.fail("trimmed again"))
    monkeypatch.setattr(pipeline, "adapt_checkpoints", lambda *a, **k: pytest.fail("adapted again"))
    texts = [play(i) for i in range(8)]
    corpora = D.demo_corpora(texts, (review_rows(48, 1), review_rows(12, 2), review_rows(24, 3)), seed=0)
    budget = pipeline.Budget(train_steps=3, train_batch=2, train_len=48, cls_steps=3, cls_batch=4, cls_len=24,
                             gen_examples=4, gen_new_tokens=4, timing_examples=2)
    again = pipeline.run(root / "run", root / "source", corpora, budget, backend="numpy", log=lambda *a: None)
    assert np.isfinite(again["generation"]["t5gemma2"]["nll"][0])


def test_the_reading_names_a_classifier_that_learnt_nothing():
    """A classifier whose accuracy interval does not clear the majority class is named as such,
    and the encoder head is not said to win by it; one that clears it (the control) is not."""
    from minencdec.experiments.report import _reading

    def reading(t5_acc):
        cls = {"majority class": {"accuracy": (0.65, 0.60, 0.70)},
               "gemma3": {"accuracy": (0.55, 0.50, 0.60)}, "t5gemma2": {"accuracy": t5_acc},
               "difference t5gemma2 - gemma3": {"accuracy": (0.2, 0.1, 0.3)}}
        gen = {"difference t5gemma2 - gemma3": {"nll": (0.0, -0.1, 0.1)},
               "t5gemma2": {"samples": [{"generated": "a"}, {"generated": "b"}]}}
        return "\n".join(_reading(cls, gen, {"train_steps": 2, "train_batch": 2, "train_len": 8}))

    stuck = reading((0.65, 0.60, 0.70))
    assert "The T5Gemma 2 classifier does not beat always answering the majority class" in stuck
    assert "no higher than the majority class" in stuck and "as the paper reports" not in stuck
    learnt = reading((0.85, 0.80, 0.90))
    assert "The T5Gemma 2 classifier does not beat" not in learnt and "as the paper reports" in learnt
    assert "The Gemma 3 classifier does not beat" in learnt


def test_encoder_attention_share_against_uniform_attention(tiny_run):
    """With every decoder query zero, every score is 0 and the merged softmax is uniform over
    the visible keys: reference token t sees its t + 1 own tokens and the S encoder tokens, so
    the share is the mean over t of S / (S + t + 1), worked out here by hand. The untouched
    model (the control) is not uniform."""
    from minencdec.experiments import evaluate as ev
    from minencdec.io.pretrained import load_pretrained
    from minencdec.io.vocab import load_tokenizer

    root, _ = tiny_run
    tok = load_tokenizer(root / "run" / "gemma3")
    model = load_pretrained(root / "run" / "t5gemma2", "float64")
    pairs = [{"input": "thou art the king", "target": "good night"},
             {"input": "the fool who speaks of love and war", "target": "a sword"}]
    expected = []
    for p in pairs:
        S = len(ev.prompt_ids(tok, p["input"]))
        T = 1 + len(tok.encode(p["target"]))                        # bos + the reference
        assert T <= model.config.decoder.sliding_window             # no window cuts a row's keys
        expected.append(np.mean([S / (S + t + 1) for t in range(T)]))
    control = ev.encoder_attention_share(model, tok, pairs)
    for name, w in model.params.items():
        if name.startswith("model.decoder.") and name.endswith("q_proj.weight"):
            w[...] = 0.0
    assert ev.encoder_attention_share(model, tok, pairs) == pytest.approx(np.mean(expected), abs=1e-12)
    assert abs(control - np.mean(expected)) > 1e-3
    with pytest.raises(ValueError, match="merged attention"):
        ev.encoder_attention_share(load_pretrained(root / "run" / "gemma3"), tok, pairs)


def test_other_passages_swap_every_input_and_keep_the_targets():
    from minencdec.experiments import evaluate as ev

    pairs = [{"input": f"passage {i}", "target": f"line {i}"} for i in range(5)]
    wrong = ev.other_passages(pairs)
    assert [w["target"] for w in wrong] == [p["target"] for p in pairs]
    assert all(w["input"] != p["input"] for w, p in zip(wrong, pairs))
    assert sorted(w["input"] for w in wrong) == sorted(p["input"] for p in pairs)   # a permutation
    with pytest.raises(ValueError, match="at least two"):
        ev.other_passages(pairs[:1])


def test_the_pipeline_measures_whether_each_model_reads_its_input(tiny_run):
    root, results = tiny_run
    reading = results["reading"]
    assert set(reading) == {"gemma3", "t5gemma2 (adapted, untrained)", "t5gemma2"}
    for name, r in reading.items():
        own, other, diff = r["nll_own"], r["nll_other"], r["difference"]
        assert diff[0] == pytest.approx(other[0] - own[0])            # paired: the difference of the means
        assert ("encoder_attention_share" in r) == name.startswith("t5gemma2")
    # the trained models' own-passage NLL is the generation step's, not a second measurement
    assert reading["t5gemma2"]["nll_own"] == results["generation"]["t5gemma2"]["nll"]
    report = write_report(root / "run").read_text()
    assert "## Does each model read its input?" in report
    assert f"{reading['t5gemma2']['encoder_attention_share']:.1%}" in report
    assert reading["t5gemma2"]["attention_pairs"] == 4                # the tiny run's 4 test pairs, not 8
    assert "reference tokens of the first 4 test pairs" in report


def test_the_reading_says_whether_the_encoder_is_read():
    """Sentences from pipeline.reading: a difference interval above 0 says the encoder is read;
    one holding 0 says it is not, and names the fall of the attention on the encoder."""
    from minencdec.experiments.report import _reads_input

    def reading(diff):
        start = {"difference": (0.5, 0.1, 0.9), "nll_own": (9.0, 8.5, 9.5), "encoder_attention_share": 0.25}
        return "\n".join(_reads_input({"t5gemma2 (adapted, untrained)": start,
                                       "t5gemma2": {"difference": diff, "encoder_attention_share": 0.02}}))

    ignored = reading((0.001, -0.002, 0.004))
    assert "does **not** read its encoder" in ignored and "fell from 25.0% at adaptation to 2.0%" in ignored
    assert "the passage moved its predictions" in ignored          # the start's interval clears 0 ...
    start_ignored = "\n".join(_reads_input({"t5gemma2 (adapted, untrained)": {
        "difference": (-0.03, -0.6, 0.5), "nll_own": (9.0, 8.5, 9.5), "encoder_attention_share": 0.25},
        "t5gemma2": {"difference": (0.001, -0.002, 0.004), "encoder_attention_share": 0.02}}))
    assert "did not measurably move its predictions" in start_ignored   # ... and here it does not
    read = reading((0.3, 0.1, 0.5))
    assert "reads its encoder" in read and "not" not in read
    assert _reads_input(None) == []
