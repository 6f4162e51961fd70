"""Scores of the ablation runs, and the paper's claims as paired comparisons (ablations.py).

    generation_scores(model, tok, rows, lines, plan)   per-example PrefixLM NLL, next-line NLL, chrF
    summary(scores, reviews)                          each model's scores with bootstrap intervals
    claims(scores, seeds)                             each claim: the paired difference, its verdict
    cost(models, tok, lines, reviews, plan)           FLOPs and measured seconds per example

A claim compares two arms on the same test examples. Its difference is oriented so that a
positive value is what the paper reports (lower NLL, higher accuracy or chrF for the arm the
paper favours), with a 95% paired bootstrap interval over the test examples (metrics.py), for
each seed and for the per-example scores averaged over the seeds. The verdict reads that
last interval: "agrees" when it lies above 0, "against" when below, else "unresolved"; and
"negligible" when the whole interval lies within NEGLIGIBLE of 0 (a difference too small to
matter at any scale: a causal and a bidirectional encoder can differ by 1e-4 nats and still
exclude 0 when thousands of test tokens pair up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from minencdec.model.efficiency import classifier_flops, flops
from minencdec.model.t5gemma import T5GemmaModel, shift_right
from minencdec.training.objectives import prefix_lm_batch

from . import evaluate as ev
from . import metrics
from .datasets import LABELS

# metric -> (what it is, +1 if higher is better else -1); an accuracy reads a "_correct" list
METRICS = {"prefix_nll": ("held-out PrefixLM NLL (nats/token)", -1),
           "next_line_nll": ("next-line NLL (nats/token)", -1),
           "chrf": ("next-line chrF", +1),
           "review_accuracy": ("sentiment accuracy", +1),
           "play_accuracy": ("which-play accuracy", +1)}
_PER_EXAMPLE = {"prefix_nll": "prefix_nll", "next_line_nll": "next_line_nll", "chrf": "chrf",
                "review_accuracy": "reviews_correct", "play_accuracy": "plays_correct"}
# Differences smaller than these are no effect, whatever their interval (fixed before any run).
NEGLIGIBLE = {"prefix_nll": 0.005, "next_line_nll": 0.005, "chrf": 0.5,
              "review_accuracy": 0.005, "play_accuracy": 0.005}
# A claim reads every metric of its kind (fixed before any run, so none is picked by its result).
GENERATION = ("prefix_nll", "next_line_nll", "chrf")
CLASSIFICATION = ("play_accuracy", "review_accuracy")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: `better` should beat `worse` on `metrics`. `why` is the likely
    reason when this scale does not show it (report.md prints it then)."""

    key: str
    title: str
    setting: str
    paper: str
    better: str
    worse: str
    metrics: tuple
    why: str


CLAIMS = (
    Claim("causal-encoder", "A bidirectional encoder beats a causal one",
          "small-small PrefixLM+KD as adapted (bidirectional encoder) against the same arm whose encoder keeps "
          "its causal mask (`GemmaConfig.causal_encoder`); the classifiers read the encoder's last token in both.",
          "keeping the encoder causal costs about 4 points.",
          "small-small", "small-small-causal", GENERATION + CLASSIFICATION,
          "the adapted encoder starts as a causal decoder, so the causal arm keeps the attention pattern its "
          "weights were pretrained for, while the bidirectional arm must first learn to use the tokens to its "
          "right; the paper adapts on about 2 T tokens, this run on {arm_tokens}."),
    Claim("ul2-classifies", "UL2 gives the better encoder for classification",
          "small-small adapted with UL2 against small-small adapted with PrefixLM+KD, the same steps, then the "
          "same classifier fine-tuning on each task.",
          "UL2 gives the better encoder representation (higher SuperGLUE scores).",
          "small-small-ul2", "small-small", CLASSIFICATION,
          "UL2's denoisers teach the encoder to represent a corrupted input, which pays off after many steps; "
          "here each arm adapts for {train_steps} steps. The review classifiers of every model stay near the "
          "majority class: toys pretrained on the plays alone cannot read sentiment in modern English from 500 "
          "reviews."),
    Claim("kd-generates", "PrefixLM+KD is the stronger generator",
          "the same two arms on generation; UL2's PrefixLM loss is read with its [S2S] mode token in front, as "
          "UL2 trains its prefix-LM denoiser (the next lines are read without, as for every model).",
          "PrefixLM with distillation gives the better generation (pretraining) results.",
          "small-small", "small-small-ul2", GENERATION,
          "PrefixLM+KD learns the teacher's distribution, and here the teacher is a toy pretrained for "
          "{pretrain_steps} steps: distillation pulls the student towards a weak model, while UL2 learns from the "
          "text itself (the paper's teacher is a Gemma 2 trained on trillions of tokens). chrF of greedy lines "
          "from models this small is near its floor for every model."),
    Claim("warmup-helps", "A short cross-attention warmup helps an unbalanced pair",
          "large-small (random cross-attention) trained with every weight from step 0 against the same with only "
          "cross-attention trained for the first {warmup_short} steps; every arm trains {train_steps} steps in all, "
          "so warmup steps come out of the full-model steps.",
          "about 1K steps of cross-attention warmup help an unbalanced pair (9B-2B).",
          "large-small-warmup-short", "large-small", GENERATION,
          "at this size the random cross-attention is learnt within a few steps either way, and the post-norm "
          "bounds the noise it adds to the small decoder at step 0 (model/adapt.py)."),
    Claim("long-warmup-hurts", "A long warmup hurts",
          "large-small with a warmup of {warmup_short} steps against one of {warmup_long} (the paper's 1:5).",
          "5K warmup steps are worse than 1K.",
          "large-small-warmup-short", "large-small-warmup-long", GENERATION,
          "the total budget is fixed, so the long warmup leaves fewer steps for the whole model: a cost the "
          "paper's far longer runs hardly feel; if the long warmup does not lose here, the frozen steps did "
          "little harm at this learning rate."),
    Claim("unbalanced", "An unbalanced pair reads better at about the small pair's cost",
          "large-small (short warmup; the KD teacher is the large toy) against small-small (teacher: the small "
          "toy): a bigger encoder, the same small decoder.",
          "9B-2B clearly beats 2B-2B at a generation cost close to 2B-2B's.",
          "large-small-warmup-short", "small-small", GENERATION + CLASSIFICATION,
          "the large toy itself is only a little better than the small one after {pretrain_steps} pretraining "
          "steps, so its encoder has little more to give; and its random cross-attention must be learnt in "
          "{train_steps} steps."),
)


# ---------------------------------------------------------------------------- scores

def _nll_rows(logits, targets) -> np.ndarray:
    """Mean NLL per row of `targets` (B, T) under `logits` (B, T, V), in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0].mean(axis=1)


def prefix_nll(model, rows, mode_id=None, batch_size=16) -> np.ndarray:
    """Per row: the NLL of its second half given its first. An encoder-decoder reads the first
    half with its encoder (`mode_id` in front, for UL2), a decoder-only model reads the row."""
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = np.asarray(rows[b:b + batch_size], dtype=np.int64)
        if isinstance(model, T5GemmaModel):
            ids, mask, labels = prefix_lm_batch(chunk)
            if mode_id is not None:
                ids = np.concatenate([np.full((len(ids), 1), mode_id), ids], 1)
                mask = np.ones_like(ids)
            dec = model.config.decoder
            dec_ids = shift_right(labels, dec.bos_token_id, dec.pad_token_id)
            out.append(_nll_rows(model.logits(ids, dec_ids, mask, np.ones_like(dec_ids)), labels))
        else:
            k = chunk.shape[1] // 2
            out.append(_nll_rows(model.logits(chunk)[:, k - 1:-1], chunk[:, k:]))   # position j predicts j + 1
    return np.concatenate(out)


def generation_scores(model, tok, rows, lines, plan, objective=None) -> dict:
    """Per-example generation scores on the test plays, and three samples."""
    mode = tok.mode_ids["[S2S]"] if objective == "ul2" else None
    shown = lines[:plan.gen_examples]
    texts = ev.continuations(model, tok, shown, plan.gen_new_tokens)
    return {"prefix_nll": prefix_nll(model, rows, mode).tolist(),
            "next_line_nll": ev.reference_nll(model, tok, lines).tolist(),
            "chrf": [metrics.chrf(h, p["target"]) for h, p in zip(texts, shown)],
            "samples": [{"input": p["input"], "target": p["target"], "generated": t}
                        for p, t in zip(shown[:3], texts[:3])]}


def summary(scores: dict, tasks: dict) -> dict:
    """seed -> model -> metric -> (value, low, high); "mean over seeds" averages each test
    example's score over the seeds first (macro-F1 is per seed only). `tasks`: the
    classification tasks' (train, validation, test) splits, by name."""
    gold = {task: np.array([e["label"] for e in splits[2]]) for task, splits in tasks.items()}
    out = {}
    for seed, models in scores.items():
        out[seed] = {name: _summarise(s, gold) for name, s in models.items()}
    names = set.intersection(*(set(m) for m in scores.values()))
    out["mean over seeds"] = {name: _summarise(_mean_scores([scores[s][name] for s in scores]), {})
                              for name in sorted(names)}
    out["majority class"] = {}
    for task, splits in tasks.items():
        majority = np.bincount([e["label"] for e in splits[0]]).argmax()
        out["majority class"][task] = {"accuracy": metrics.bootstrap((gold[task] == majority).astype(float)),
                                       "class": LABELS[majority] if task == "reviews" else int(majority)}
    return out


def _summarise(s: dict, gold: dict) -> dict:
    row = {m: metrics.bootstrap(s[key]) for m, key in _PER_EXAMPLE.items() if key in s}
    for task, labels in gold.items():
        if f"{task}_predictions" in s:
            n = int(labels.max()) + 1
            row[f"{task}_macro_f1"] = metrics.bootstrap(np.stack([s[f"{task}_predictions"], labels], 1),
                                                        lambda x, n=n: metrics.macro_f1(x[:, 0], x[:, 1], n))
            row[f"{task}_validation_accuracy"] = s[f"{task}_validation_accuracy"]
    return row


def _mean_scores(runs: list) -> dict:
    keys = set.intersection(*(set(r) for r in runs)) & set(_PER_EXAMPLE.values())
    return {k: np.mean([r[k] for r in runs], axis=0).tolist() for k in keys}


# ---------------------------------------------------------------------------- claims

def _oriented(a, b, sign):
    """The paired difference mean(a) - mean(b) turned so that positive favours `a` as the
    paper does: for a lower-is-better metric, mean(b) - mean(a)."""
    d, lo, hi = metrics.paired_bootstrap(a, b)
    return (d, lo, hi) if sign > 0 else (-d, -hi, -lo)


def verdict_of(interval, negligible) -> str:
    """The verdict on an oriented (difference, low, high): see the module docstring."""
    _, lo, hi = interval
    if max(abs(lo), abs(hi)) < negligible:
        return "negligible"
    return "agrees" if lo > 0 else "against" if hi < 0 else "unresolved"


def claims(scores: dict, seeds) -> list[dict]:
    out = []
    for claim in CLAIMS:
        rows = []
        for metric in claim.metrics:
            key, sign = _PER_EXAMPLE[metric], METRICS[metric][1]
            per_seed = {}
            for s in map(str, seeds):
                a, b = scores[s][claim.better][key], scores[s][claim.worse][key]
                per_seed[s] = {"better": float(np.mean(a)), "worse": float(np.mean(b)),
                               "advantage": _oriented(a, b, sign)}
            a = np.mean([scores[str(s)][claim.better][key] for s in seeds], axis=0)
            b = np.mean([scores[str(s)][claim.worse][key] for s in seeds], axis=0)
            pooled = _oriented(a, b, sign)
            verdict = verdict_of(pooled, NEGLIGIBLE[metric])
            rows.append({"metric": metric, "per_seed": per_seed, "pooled": pooled, "verdict": verdict,
                         "seeds_same_sign": len({np.sign(v["advantage"][0]) for v in per_seed.values()}) == 1})
        out.append({**asdict(claim), "results": rows})
    return out


# ---------------------------------------------------------------------------- cost

def _generate_each(model, prompts, new_tokens):
    """Greedy generation of exactly `new_tokens` after each prompt, one at a time (batch 1,
    no stop at eos: every model does the same work)."""
    for ids in prompts:
        model.generate(np.array([ids]), max_new_tokens=new_tokens, eos_token_id=-1)


def cost(models: dict, tok, lines, reviews_test, plan) -> dict:
    """FLOPs (from the configs) and measured seconds per example, generation and classification."""
    prompts = [ev.prompt_ids(tok, p["input"]) for p in lines[:plan.timing_examples]]
    n_in = int(np.mean([len(ev.prompt_ids(tok, p["input"])) for p in lines]))
    n_cls = int(np.mean([min(len(tok.encode(e["text"])) + 1, plan.cls_len) for e in reviews_test]))
    out = {}
    for name, model in models.items():
        seconds = ev.seconds_per_example(lambda ex, m=model: _generate_each(m, ex, plan.gen_new_tokens), prompts)
        out[name] = {"generation_gflops": flops(model.config, n_in, plan.gen_new_tokens).total / 1e9,
                     "generation_ms": seconds * 1e3,
                     "classification_gflops": classifier_flops(model.config, n_cls) / 1e9,
                     "parameters": int(sum(v.size for v in model.params.values())),
                     "input_tokens": n_in, "new_tokens": plan.gen_new_tokens, "review_tokens": n_cls}
    pair, small = out.get("large-small-warmup-short"), out.get("small-small")
    if pair and small:                                   # the unbalanced claim's cost, as ratios
        out["ratio large-small / small-small"] = {k: pair[k] / small[k] for k in
                                                  ("generation_gflops", "generation_ms", "classification_gflops")}
    return out
