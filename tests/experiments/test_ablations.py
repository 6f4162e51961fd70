"""`minencdec reproduce`'s harness (experiments/ablations*.py) end to end on a very small budget.

Oracles, each independent of the code under test:
- splits: the play split is checked against the next-line examples' own play numbers, and
  the test rows against rows packed here from the test plays alone;
- the held-out PrefixLM loss against the model's own fused training loss (another code
  path: loss_and_grads) on the same rows, with and without UL2's mode token;
- every claim's point value against means taken here from the per-example scores, and its
  verdict against the signs of its interval;
- the report: every decimal number in report.md is found in results.json (a planted number
  is the negative control);
- resume: a run interrupted inside an arm's training and started again ends with exactly the
  scores of a run that was never interrupted, without training any finished step again.
"""

import json
import random
import re

import numpy as np
import pytest

from minencdec.experiments import ablations as A
from minencdec.experiments import ablations_scores as S
from minencdec.experiments.ablations_report import write_report
from minencdec.experiments.datasets import check_disjoint
from minencdec.model.presets import preset
from minencdec.training.data import pack

WORDS = ("thou art the king and i the fool who speaks of love war night day sword crown "
         "good bad fine great awful pill pain sleep better worse").split()
PLAN = A.Plan(seeds=(0, 1), vocab_size=480, small=(16, 2), large=(24, 2), head_dim=8, window=8, seq_len=32, batch=4,
              pretrain_steps=4, train_steps=4, warmup_short=1, warmup_long=2, cls_steps=3, cls_batch=4, cls_len=24,
              test_rows=8, gen_examples=3, gen_new_tokens=4, timing_examples=1)


def play(seed, lines=80):
    r = random.Random(seed)
    return "\n".join("KING." if i % 7 == 0 else " ".join(r.choice(WORDS) for _ in range(r.randint(4, 9)))
                     for i in range(lines))


def reviews(n, seed):
    r = random.Random(seed)
    word = ("awful", "fine", "great")
    return [{"text": f"this pill is {word[i % 3]} " + " ".join(r.choice(WORDS) for _ in range(6)) + f" #{seed}-{i}",
             "label": i % 3} for i in range(n)]


def data():
    return A.ablation_data([play(i) for i in range(12)], (reviews(48, 1), reviews(12, 2), reviews(24, 3)), seed=0)


def quiet(*_):
    pass


def no_loss_plots(mp):
    """Each training run's loss.png (train.py, tested there) is a third of this file's time."""
    mp.setattr("minencdec.training.train.plot_history", lambda *a, **k: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "run"
    with pytest.MonkeyPatch.context() as mp:
        no_loss_plots(mp)
        results = A.run(out, data(), PLAN, backend="numpy", log=quiet, command="minencdec reproduce --out run")
    write_report(out)
    return out, results


# ---------------------------------------------------------------------------- data and plan

def test_plays_are_split_whole_and_the_test_rows_come_from_the_test_plays(finished):
    out, results = finished
    d = data()
    plays = d.plays
    assert set(plays["train"]) | set(plays["validation"]) | set(plays["test"]) == set(range(12))
    assert not (set(plays["train"]) & set(plays["test"]) or set(plays["train"]) & set(plays["validation"])
                or set(plays["validation"]) & set(plays["test"]))
    for split, lines in zip(("train", "validation", "test"), d.next_lines):        # the examples' own play numbers
        assert {e["play"] for e in lines} <= set(plays[split])
    check_disjoint(*d.reviews)
    assert results["data"]["plays"] == plays
    # the scored rows are rows of the test plays, packed here independently
    from minencdec.io.tokenizer import Tokenizer
    tok = Tokenizer.load(out / "tokenizer")
    test = {tuple(r) for r in pack(tok.encode_many([play(i) for i in plays["test"]]), PLAN.seq_len, tok.eos_id)}
    train = {tuple(r) for r in pack(tok.encode_many([play(i) for i in plays["train"]]), PLAN.seq_len, tok.eos_id)}
    scored = A.rows(tok, d, PLAN)["test"]
    assert len(scored) == results["data"]["test_rows"] == PLAN.test_rows
    assert all(tuple(r) in test and tuple(r) not in train for r in scored)


def test_the_default_small_toy_is_the_tiny_preset_and_every_plan_builds():
    tiny = preset("tiny")
    small = A.toy_config(A.Plan(), "small", tiny.vocab_size)
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window"):
        assert getattr(small, field) == getattr(tiny, field), field
    for plan in (A.Plan(), A.QUICK, PLAN):
        large, small = A.toy_config(plan, "large", 512), A.toy_config(plan, "small", 512)
        assert large.hidden_size > small.hidden_size and large.num_hidden_layers >= small.num_hidden_layers
    for plan in (A.Plan(), A.QUICK):                                 # the paper's 1K : 5K warmups
        assert plan.warmup_long == 5 * plan.warmup_short < plan.train_steps


def test_another_plan_in_the_same_directory_is_refused_before_anything_is_written(finished, tmp_path):
    out, _ = finished

    def files():                                     # the lock file holds the pid of its last holder
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}

    before = files()
    with pytest.raises(ValueError, match=r"another plan \(train_steps 4 -> 5\)"):
        A.run(out, data(), A.Plan(**{**PLAN.__dict__, "train_steps": 5}), backend="numpy", log=quiet)
    assert files() == before


# ---------------------------------------------------------------------------- scores and claims

def test_prefix_nll_is_the_models_own_training_loss(finished):
    from minencdec.io.pretrained import load_pretrained
    from minencdec.io.tokenizer import Tokenizer
    from minencdec.training.objectives import prefix_lm_batch
    out, _ = finished
    tok = Tokenizer.load(out / "tokenizer")
    rows = A.rows(tok, data(), PLAN)["test"].astype(np.int64)
    model = load_pretrained(out / "seed-0" / "small-small-ul2" / "checkpoint", dtype="float64")
    ids, mask, labels = prefix_lm_batch(rows)
    loss, _ = model.loss_and_grads(ids, labels, mask)
    assert np.isclose(S.prefix_nll(model, rows).mean(), loss, rtol=1e-10)
    mode = tok.mode_ids["[S2S]"]
    with_mode = np.concatenate([np.full((len(ids), 1), mode), ids], 1)
    loss, _ = model.loss_and_grads(with_mode, labels, np.ones_like(with_mode))
    assert np.isclose(S.prefix_nll(model, rows, mode).mean(), loss, rtol=1e-10)
    decoder_only = load_pretrained(out / "pretrain-small" / "checkpoint", dtype="float64")
    k = rows.shape[1] // 2
    masked = np.where(np.arange(rows.shape[1]) >= k, rows, -100)          # score the second half only
    loss, _ = decoder_only.loss_and_grads(rows, masked)
    assert np.isclose(S.prefix_nll(decoder_only, rows).mean(), loss, rtol=1e-10)


def test_claims_are_the_means_of_the_per_example_scores(finished):
    _, results = finished
    scores = results["scores"]
    assert [c["key"] for c in results["claims"]] == [c.key for c in S.CLAIMS]
    for claim in results["claims"]:
        for row in claim["results"]:
            key = S._PER_EXAMPLE[row["metric"]]
            sign = S.METRICS[row["metric"]][1]
            a = np.mean([np.mean(scores[str(s)][claim["better"]][key]) for s in PLAN.seeds])
            b = np.mean([np.mean(scores[str(s)][claim["worse"]][key]) for s in PLAN.seeds])
            value, lo, hi = row["pooled"]
            assert np.isclose(value, sign * (a - b), atol=1e-12)
            assert lo <= value <= hi
            small = max(abs(lo), abs(hi)) < S.NEGLIGIBLE[row["metric"]]
            assert row["verdict"] == ("negligible" if small else "agrees" if lo > 0 else "against" if hi < 0
                                      else "unresolved")
            for s, v in row["per_seed"].items():
                assert np.isclose(v["advantage"][0], sign * (v["better"] - v["worse"]), atol=1e-12)


def test_a_verdict_follows_its_interval():
    """Two arms whose per-example scores differ by a known amount, in both directions and not at all."""
    def run_claims(shift):
        base = np.linspace(0.0, 1.0, 40)
        scores = {"0": {name: {"prefix_nll": (base + (shift if name == "small-small-ul2" else 0.0)).tolist(),
                               **{k: base.tolist() for k in ("next_line_nll", "chrf", "reviews_correct",
                                                             "plays_correct")}}
                        for name in {a.name for a in A.ARMS}}}
        return {c["key"]: c["results"][0] for c in S.claims(scores, (0,))}
    worse_ul2 = run_claims(0.5)["kd-generates"]             # UL2's NLL higher by 0.5: as the paper says
    assert worse_ul2["verdict"] == "agrees" and np.isclose(worse_ul2["pooled"][0], 0.5)
    assert run_claims(-0.5)["kd-generates"]["verdict"] == "against"
    assert run_claims(0.0)["kd-generates"]["verdict"] == "negligible"
    assert run_claims(0.001)["kd-generates"]["verdict"] == "negligible"   # excludes 0, too small to matter
    assert run_claims(0.02)["kd-generates"]["verdict"] == "agrees"


def test_an_interval_holding_0_is_unresolved():
    """Scores whose paired differences scatter around 0 by far more than the negligible distance."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    interval = S._oriented(a, b, -1)
    assert interval[1] < 0 < interval[2] and S.verdict_of(interval, 0.005) == "unresolved"


def test_a_next_line_is_the_first_line_with_text(finished):
    """A model that answers a line break first: evaluate.continuations scores the line the
    model then wrote; cutting at the first break (the negative control) gives an empty line."""
    from minencdec.experiments import evaluate as ev
    from minencdec.io.tokenizer import Tokenizer
    out, _ = finished
    tok = Tokenizer.load(out / "tokenizer")
    answer = tok.encode("\n\nthe king speaks\nof war")

    class BreakFirst:                                    # decoder-only: returns the prompt and the answer
        def generate(self, ids, max_new_tokens, attention_mask):
            return np.concatenate([ids, np.tile(answer, (len(ids), 1))], 1)

    pairs = [{"input": "good night", "target": "x"}, {"input": "a longer passage here", "target": "y"}]
    assert ev.continuations(BreakFirst(), tok, pairs, len(answer)) == ["the king speaks"] * 2
    assert tok.decode(answer).split("\n")[0].strip() == ""


# ---------------------------------------------------------------------------- the report

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")
CITED = ("arXiv 2504.06225", "section 3.2")          # the paper's numbers, not the run's


def untraced(text: str, results: dict) -> list[str]:
    """The decimal numbers of `text` found nowhere in `results` (as shown, or x 100 for
    accuracies in points; or inside one of its strings)."""
    floats, strings = [], []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            floats.append(float(x))
        elif isinstance(x, str):
            strings.append(x)

    walk(results)
    for cited in CITED:
        text = text.replace(cited, "")
    shown = {d: {f"{v * k:.{d}f}" for v in floats for k in (1, 100)} | {f"{-v * k:.{d}f}" for v in floats
                                                                        for k in (1, 100)} for d in range(1, 7)}
    missing = []
    for number in NUMBER.findall(text):
        plain = number.lstrip("+")
        digits = len(plain.split(".")[1])
        if plain not in shown.get(digits, ()) and not any(number in s for s in strings):
            missing.append(number)
    return missing


def test_every_number_of_the_report_is_in_results_json(finished):
    out, _ = finished
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert untraced(report, results) == []
    assert len(NUMBER.findall(report)) > 50                 # the check saw the tables
    assert untraced(report + "\n| planted | 0.123457 |\n", results) == ["0.123457"]     # negative control
    for png in ("claims.png", "training.png", "quality_vs_cost.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for claim in S.CLAIMS:
        assert claim.title in report
    assert "minencdec reproduce --out run" in report and "seeds 0, 1" in report


# ---------------------------------------------------------------------------- resume

def test_an_interrupted_run_continues_to_the_same_results(finished, tmp_path, monkeypatch):
    done, full = finished
    out = tmp_path / "run"
    plan = A.Plan(**{**PLAN.__dict__, "seeds": (0,)})
    real_train = A.train
    calls = []

    def interrupted(model, task, cfg, run_dir, **kw):
        calls.append(run_dir.name)
        if run_dir.name == "small-small-ul2" and not (run_dir / "checkpoint").is_dir():
            real_train(model, task, cfg, run_dir, stop_after=2, **kw)      # saved at step 2, as Ctrl-C would
            raise KeyboardInterrupt
        return real_train(model, task, cfg, run_dir, **kw)

    monkeypatch.setattr(A, "train", interrupted)
    no_loss_plots(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        A.run(out, data(), plan, backend="numpy", log=quiet)
    assert not (out / "results.json").exists()
    first = list(calls)
    calls.clear()
    again = A.run(out, data(), plan, backend="numpy", log=quiet)
    assert "pretrain-small" in first and "small-small" in first
    assert calls[0] == "small-small-ul2" and not set(calls) & set(first[:-1])      # nothing finished ran again
    state = json.loads((out / "seed-0" / "small-small-ul2" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == PLAN.train_steps
    steps = [json.loads(line)["step"] for line in (out / "seed-0" / "small-small-ul2" / "metrics.jsonl").open()
             if "loss" in line and "val_loss" not in line]
    assert steps == sorted(set(steps))                                                 # no step logged twice
    assert again["scores"]["0"] == full["scores"]["0"]                                # exactly the same numbers
    assert again["time"]["sessions"] == 2
