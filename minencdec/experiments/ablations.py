"""The paper's ablations on tiny models trained from scratch (`minencdec reproduce`).

The real-weights demo (pipeline.py) adapts one released checkpoint. The paper's other claims
need knobs a released checkpoint does not offer, so here every model is small enough to
train from scratch on a laptop, and each knob is turned with everything else held fixed:

    1 tokenizer  one sentencepiece model on the training plays and the training reviews
    2 pretrain   two decoder-only Gemma 2 toys on the training plays, "small" and "large"
                 (once, seed `pretrain_seed`: the released checkpoint every arm starts from)
    3 arms       per seed, six encoder-decoders adapted from them (ARMS), the same budget each:
                   small-small  PrefixLM+KD | UL2 | PrefixLM+KD with a causal encoder
                   large-small  PrefixLM+KD with cross-attention warmup none | short | long
    4 scores     generation: held-out PrefixLM loss on rows of the test plays, NLL and chrF
                 of greedy next lines of the test plays; classification (CLASSIFY), after
                 the same fine-tuning budget: drug-review sentiment, and which play a
                 passage is from (arms marked `classify`, and both decoder-only toys)
    5 claims     each claim of the paper (CLAIMS) as paired differences over the same test
                 examples, per seed and averaged over seeds, with 95% bootstrap intervals

A seed sets an arm's data order, its random cross-attention, UL2's noise and the classifier's
head and batches; the pretrained toys are shared, as the paper's arms share one Gemma 2.
Nothing is chosen on test data: the plan is fixed before the run, validation splits are only
reported. Every step writes into the run directory and is skipped when its output is there,
so an interrupted run continues (training resumes from its checkpoint). results.json holds
every number, the per-example scores included (ablations_scores.py computes them and the
claims); ablations_report.py writes report.md and the figures from it; ablations_data.py
holds the splits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from minencdec.io.pretrained import load_pretrained
from minencdec.io.tokenizer import Tokenizer, train_tokenizer
from minencdec.model.adapt import adapt_params
from minencdec.model.classify import Classifier
from minencdec.model.config import GemmaConfig
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel, cross_attention_names
from minencdec.training.data import pack
from minencdec.training.rundir import CHECKPOINT_DIR, METRICS_FILE, digest_bytes, locked
from minencdec.training.tasks import CausalLMTask, ClassificationTask, Seq2SeqTask
from minencdec.training.train import TrainConfig, train

from . import evaluate as ev
from .ablations_data import CLASSIFY, Data, ablation_data  # noqa: F401 (ablation_data: reproduce's entry)
from .ablations_scores import claims, cost, generation_scores, summary
from .datasets import check_disjoint


@dataclass(frozen=True)
class Plan:
    """Everything that sets the run's cost, fixed before it starts (never tuned on test data).
    The default is sized for about 35 minutes on 2 loaded cores, within the hour's budget:
    estimated from the training throughput measured at these sizes (README: the estimate)."""

    seeds: tuple = (0, 1)
    pretrain_seed: int = 0
    vocab_size: int = 2048
    small: tuple = (128, 4)            # (width, layers): the "tiny" preset's shape
    large: tuple = (192, 4)            # 2.1x small's parameters; wider, not deeper: a 6-layer
                                       # toy trained worse on the validation plays in 400 steps
    head_dim: int = 32
    window: int = 64
    seq_len: int = 128                 # packed rows; PrefixLM splits them in half
    batch: int = 16
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    train_steps: int = 200             # every arm
    train_lr: float = 1e-3
    warmup_short: int = 10             # cross-attention warmup steps: the paper's 1K and 5K
    warmup_long: int = 50              # are 1:5, and so are these
    cls_steps: int = 100
    cls_batch: int = 16
    cls_len: int = 96                  # review tokens read (bos included)
    cls_lr: float = 3e-4               # chosen on the validation reviews (1e-3 overfits by step 60)
    test_rows: int = 256               # held-out PrefixLM rows scored
    gen_examples: int = 48             # greedy next lines scored by chrF
    gen_new_tokens: int = 16
    timing_examples: int = 4


QUICK = Plan(seeds=(0,), vocab_size=1024, small=(64, 2), large=(96, 2), head_dim=16, window=32, seq_len=64,
             batch=8, pretrain_steps=60, train_steps=40, warmup_short=4, warmup_long=20, cls_steps=30, cls_batch=8,
             cls_len=48, test_rows=32, gen_examples=8, gen_new_tokens=8, timing_examples=2)


@dataclass(frozen=True)
class Arm:
    """One encoder-decoder: its encoder's source ("small" or "large"; the decoder always
    comes from the small toy), objective, cross-attention warmup and encoder mask. The KD
    teacher is the encoder's source (the larger model of an unbalanced pair)."""

    name: str
    encoder: str
    objective: str = "prefixlm-kd"
    warmup: str | None = None          # None, "short" or "long" (Plan.warmup_short / warmup_long)
    causal_encoder: bool = False
    classify: bool = False             # also fine-tuned as a classifier


ARMS = (Arm("small-small", "small", classify=True),
        Arm("small-small-ul2", "small", "ul2", classify=True),
        Arm("small-small-causal", "small", causal_encoder=True, classify=True),
        Arm("large-small", "large"),
        Arm("large-small-warmup-short", "large", warmup="short", classify=True),
        Arm("large-small-warmup-long", "large", warmup="long"))
DECODER_ONLY = ("small", "large")      # references: pretraining only, then the classifier budget


def toy_config(plan: Plan, size: str, vocab_size: int) -> GemmaConfig:
    """A Gemma 2 stack of Plan.small or Plan.large: heads of head_dim, half as many kv heads."""
    width, layers = getattr(plan, size)
    heads = width // plan.head_dim
    return GemmaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=plan.head_dim,
                       query_pre_attn_scalar=plan.head_dim, sliding_window=plan.window)


# ---------------------------------------------------------------------------- bookkeeping

class Clock:
    """Seconds per stage and the machine's load, kept in timings.json across sessions (an
    interrupted run's time adds up: only work done is counted)."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}, "sessions": []}
        self.data["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": 0.0,
                                      "load_average": [os.getloadavg()[0]]})
        self.start = time.monotonic()

    def add(self, stage: str, seconds: float) -> None:
        self.data["stages"][stage] = self.data["stages"].get(stage, 0.0) + seconds
        self._save()

    def _save(self) -> None:
        session = self.data["sessions"][-1]
        session["seconds"] = time.monotonic() - self.start
        session["load_average"].append(os.getloadavg()[0])
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")

    def summary(self) -> dict:
        """Minutes per stage and in all (the sessions' sum), and the load average's range."""
        self._save()
        loads = [x for s in self.data["sessions"] for x in s["load_average"]]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        sessions = self.data["sessions"]
        return {"minutes": sum(s["seconds"] for s in sessions) / 60, "sessions": len(sessions),
                "stage_minutes": {k: v / 60 for k, v in self.data["stages"].items()},
                "load_average": {"min": min(loads), "mean": float(np.mean(loads)), "max": max(loads)},
                "cores": cores, "date": self.data["sessions"][0]["started"]}


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _start(run_dir: Path, log) -> bool:
    """Whether a training run continues from its checkpoint. Metrics logged by a run killed
    before its first save describe steps that will be trained again: they are dropped."""
    if (run_dir / CHECKPOINT_DIR).is_dir():
        return True
    if (run_dir / METRICS_FILE).is_file():
        log(f"{run_dir}: no checkpoint was saved; starting it again")
        (run_dir / METRICS_FILE).unlink()
    return False


def _check_plan(out: Path, plan: Plan) -> None:
    """A run directory belongs to one plan: continuing it with another would mix two."""
    path = out / "plan.json"
    mine = json.loads(json.dumps(asdict(plan)))
    if path.is_file():
        theirs = json.loads(path.read_text())
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            shown = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in diff[:4])
            raise ValueError(f"{out} holds a run of another plan ({shown}): choose another --out, or delete it "
                             "to start again")
    else:
        path.write_text(json.dumps(mine, indent=1) + "\n")


# ---------------------------------------------------------------------------- steps

def tokenizer(out: Path, data: Data, plan: Plan) -> Tokenizer:
    path = out / "tokenizer"
    if not (path / "tokenizer.model").is_file():
        text = data.texts["train"] + [r["text"] for r in data.reviews[0]]
        train_tokenizer(text, plan.vocab_size, seed=plan.pretrain_seed).save(path)
    return Tokenizer.load(path)


def rows(tok, data: Data, plan: Plan) -> dict:
    """Packed rows of each split's plays; the test rows evenly spaced over the test plays."""
    out = {k: pack(tok.encode_many(v), plan.seq_len, tok.eos_id) for k, v in data.texts.items()}
    pick = np.linspace(0, len(out["test"]) - 1, min(plan.test_rows, len(out["test"]))).astype(int)
    out["test"] = out["test"][pick]
    if len(out["train"]) < plan.batch:
        raise ValueError(f"the training plays give {len(out['train'])} rows of {plan.seq_len} tokens, fewer "
                         f"than one batch of {plan.batch}")
    return out


def _config(steps, lr, warmup_fraction=0.1, **extra) -> TrainConfig:
    """Linear warmup, then cosine to lr / 10; a few saves, so an interruption loses little."""
    return TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, int(steps * warmup_fraction)),
                       eval_every=max(1, steps // 5), save_every=max(1, steps // 4), log_every=max(1, steps // 50),
                       **extra)


def pretrain(out: Path, size: str, tok, data_rows, plan: Plan, backend, log) -> Path:
    run_dir = out / f"pretrain-{size}"
    if not _done(run_dir):
        model = Gemma2Model.random(toy_config(plan, size, tok.vocab_size), seed=plan.pretrain_seed, backend=backend)
        log(f"pretraining the {size} decoder-only toy ({sum(v.size for v in model.params.values()):,} parameters)")
        task = CausalLMTask(data_rows["train"], data_rows["validation"], plan.batch, plan.pretrain_seed)
        train(model, task, _config(plan.pretrain_steps, plan.pretrain_lr), run_dir,
              resume=_start(run_dir, log), label=f"pretrain {size}", extra_files=tok.files(),
              settings={"tokenizer_sha256": digest_bytes(tok.serialized()), "seed": plan.pretrain_seed})
        (run_dir / "DONE").write_text("\n")
    return run_dir / CHECKPOINT_DIR


def adapted(arm: Arm, seed: int, sources: dict, backend) -> T5GemmaModel:
    """The arm's encoder-decoder before training (paper section 3.2): copied cross-attention
    for a balanced pair, random (seeded) for an unbalanced one; a causal encoder if asked."""
    enc, dec = sources[arm.encoder], sources["small"]
    config, params, _ = adapt_params(enc.params, enc.config, dec.params, dec.config, "auto", seed)
    if arm.causal_encoder:
        config = dataclasses.replace(config, encoder=config.encoder.replace(causal_encoder=True))
    return T5GemmaModel(config, {k: np.array(v, copy=True) for k, v in params.items()}, backend=backend)


def train_arm(run_dir: Path, arm: Arm, seed: int, sources: dict, tok, data_rows, plan: Plan, backend, log):
    """The arm after its training budget (loaded from its checkpoint when done)."""
    if _done(run_dir):
        return load_pretrained(run_dir / CHECKPOINT_DIR, backend=backend)
    model = adapted(arm, seed, sources, backend)
    warmup = {None: 0, "short": plan.warmup_short, "long": plan.warmup_long}[arm.warmup]
    teacher = sources[arm.encoder] if arm.objective == "prefixlm-kd" else None
    task = Seq2SeqTask(arm.objective, data_rows["train"], data_rows["validation"], plan.batch, seed,
                       special=tok, teacher=teacher)
    freeze = tuple(cross_attention_names(model.config)) if warmup else ()
    log(f"seed {seed}: training {arm.name} ({arm.objective}, warmup {warmup} steps)")
    # a short learning-rate warmup (2.5%): the weights are pretrained, and a cross-attention
    # warmup should run at the full rate, not inside the ramp
    train(model, task, _config(plan.train_steps, plan.train_lr, 0.025, freeze=freeze, freeze_steps=warmup),
          run_dir, resume=_start(run_dir, log), label=f"seed {seed}: {arm.name}", extra_files=tok.files(),
          settings={"arm": asdict(arm), "seed": seed, "tokenizer_sha256": digest_bytes(tok.serialized())})
    (run_dir / "DONE").write_text("\n")
    return model


def classifier(run_dir: Path, model, tok, splits, plan: Plan, seed: int, backend, log):
    """A classifier fine-tuned from `model` (the encoder's head, or a decoder-only model's
    last-token head) on a task's training split, for the same budget whatever the model."""
    if _done(run_dir):
        return load_pretrained(run_dir / CHECKPOINT_DIR, backend=backend)
    encode = lambda split: [(ev.classifier_inputs(tok, [e["text"]], plan.cls_len)[0][0], e["label"])  # noqa: E731
                            for e in split]
    task = ClassificationTask(encode(splits[0]), encode(splits[1]), plan.cls_batch, seed, pad_id=tok.pad_id)
    # from a copy: a classifier shares its stack's arrays with the model, and fine-tuning would
    # change the model in place (the pretrained toys are every later arm's source and teacher)
    copy = type(model)(model.config, {k: np.array(v, copy=True) for k, v in model.params.items()}, model.dtype,
                       model.backend)
    clf = Classifier.from_model(copy, 1 + max(e["label"] for e in splits[0]), seed=seed)
    log(f"seed {seed}: fine-tuning a classifier in {run_dir.name}")
    train(clf, task, _config(plan.cls_steps, plan.cls_lr), run_dir, resume=_start(run_dir, log),
          label=f"seed {seed}: {run_dir.name}", settings={"seed": seed})
    (run_dir / "DONE").write_text("\n")
    return clf


def classification_scores(clf, tok, splits, plan: Plan, task: str) -> dict:
    """Per test example: right or wrong, and the prediction; the validation accuracy."""
    gold = np.array([e["label"] for e in splits[2]])
    pred = ev.predictions(clf, tok, splits[2], plan.cls_len)
    val = ev.predictions(clf, tok, splits[1], plan.cls_len)
    return {f"{task}_correct": (pred == gold).astype(float).tolist(), f"{task}_predictions": pred.tolist(),
            f"{task}_validation_accuracy": float(np.mean(val == [e["label"] for e in splits[1]]))}


def _scored(path: Path, make) -> dict:
    """scores.json of one model: computed once, read back after."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(make()) + "\n")
        os.replace(tmp, path)
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- the run

def run(out, data: Data, plan: Plan = Plan(), backend="numba", log=print, command=None) -> dict:
    """Run every step (skipping the finished ones); write and return results.json's dict.
    One process per run directory (its lock); another plan there is refused."""
    out = Path(out)
    with locked(out):
        return _run(out, data, plan, backend, log, command)


def _run(out: Path, data: Data, plan: Plan, backend, log, command) -> dict:
    _check_plan(out, plan)
    check_disjoint(*data.reviews)
    check_disjoint(*data.passages)
    check_disjoint(*data.next_lines)
    clock = Clock(out)

    def stage(name, fn, *args):
        t = time.monotonic()
        result = fn(*args)
        clock.add(name, time.monotonic() - t)
        return result

    tok = stage("tokenizer", tokenizer, out, data, plan)
    data_rows = rows(tok, data, plan)
    test_lines = data.next_lines[2]
    sources, scores = {}, {}
    for size in DECODER_ONLY:
        path = stage(f"pretrain {size}", pretrain, out, size, tok, data_rows, plan, backend, log)
        sources[size] = load_pretrained(path, backend=backend)
        scores[size] = stage("scoring", _scored, out / f"pretrain-{size}" / "scores.json", lambda m=sources[size]:
                             generation_scores(m, tok, data_rows["test"], test_lines, plan))
    per_seed, models0 = {}, {}
    for seed in plan.seeds:
        here, seed_dir = {}, out / f"seed-{seed}"
        def classified(name, model):
            """Both tasks' scores of classifiers fine-tuned from `model`."""
            found = {}
            for task in CLASSIFY:
                run_dir, splits = seed_dir / f"{task}-{name}", getattr(data, {"plays": "passages"}.get(task, task))
                clf = stage("classifiers", classifier, run_dir, model, tok, splits, plan, seed, backend, log)
                found.update(stage("scoring", _scored, run_dir / "scores.json",
                                   lambda: classification_scores(clf, tok, splits, plan, task)))
            return found

        for name in DECODER_ONLY:
            here[name] = {**scores[name], **classified(name, sources[name])}
        for arm in ARMS:
            model = stage("arms", train_arm, seed_dir / arm.name, arm, seed, sources, tok, data_rows, plan,
                          backend, log)
            here[arm.name] = stage("scoring", _scored, seed_dir / arm.name / "scores.json",
                                   lambda m=model: generation_scores(m, tok, data_rows["test"], test_lines, plan,
                                                                     arm.objective))
            if arm.classify:
                here[arm.name].update(classified(arm.name, model))
            if seed == plan.seeds[0] and arm.name in ("small-small", "large-small-warmup-short"):
                models0[arm.name] = model
        per_seed[str(seed)] = here
    measured = stage("cost", _scored, out / "cost.json",
                     lambda: cost({**sources, **models0}, tok, test_lines, data.reviews[2], plan))
    results = {"command": command, "plan": asdict(plan), "backend": backend,
               "data": {"plays": data.plays, "next_lines": [len(s) for s in data.next_lines],
                        "reviews": [len(s) for s in data.reviews], "passages": [len(s) for s in data.passages],
                        "test_rows": int(len(data_rows["test"])),
                        "train_rows": int(len(data_rows["train"])), "vocab_size": tok.vocab_size,
                        "tokenizer_sha256": digest_bytes(tok.serialized())},
               "models": {size: {"parameters": int(sum(v.size for v in sources[size].params.values())),
                                 "width": sources[size].config.hidden_size,
                                 "layers": sources[size].config.num_hidden_layers} for size in DECODER_ONLY},
               "arms": [asdict(a) for a in ARMS], "scores": per_seed,
               "summary": summary(per_seed, {"reviews": data.reviews, "plays": data.passages}),
               "claims": claims(per_seed, plan.seeds), "cost": measured,
               "training": _training(out, plan)}
    results["time"] = clock.summary()
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _training(out: Path, plan: Plan) -> dict:
    """The last validation loss of every training run (from its trainer_state.json)."""
    found = {}
    for state in sorted(out.glob(f"**/{CHECKPOINT_DIR}/trainer_state.json")):
        history = json.loads(state.read_text())["history"]
        if history["val"]:
            found[str(state.parent.parent.relative_to(out))] = history["val"][-1][1]
    return found

