"""The training loop: resumable bit for bit, nothing lost, progress and plots on the way.

    run = train(model, task, TrainConfig(steps=1000), "runs/x")          # or resume=True

A *task* knows its data and objective; the loop knows nothing of either:

    task.batch(step)           -> the training batch of optimizer step `step` (a pure
                                  function of the task's seed and `step`: that is what
                                  makes resuming exact, with no data-loader state to save)
    task.loss_and_grads(model, batch) -> (loss, grads, tokens)
    task.eval_batches()        -> the fixed validation batches
    task.eval_loss(model, batch) -> (summed loss, tokens)

The run directory holds

    checkpoint/                a Hugging Face model directory (transformers loads it) plus
        optimizer.safetensors  AdamW's m and v
        trainer_state.json     step, config, RNG/data position, metrics so far
        tokenizer.model        when the task has a tokenizer
    metrics.jsonl              one JSON line per logged step and per validation
    loss.png                   training and validation loss curves

The checkpoint directory is written atomically (a temporary directory, then a rename), so
a crash or Ctrl-C during a save leaves the previous checkpoint whole. A NaN or infinite
loss stops the run before the bad step is applied and keeps the last good checkpoint.
Ctrl-C saves the current (completed) step, then exits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minencdec.files.checkpoint import CheckpointError, load_tensors, save_tensors
from .optim import AdamW, FreezeSchedule, clip_grad_norm, warmup_cosine, warmup_inverse_sqrt
from minencdec.io.progress import Progress

STATE_FORMAT = "minencdec.trainer/1"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4              # the cosine schedule's floor
    warmup_steps: int = 100           # linear warmup from 0
    schedule: str = "cosine"          # or "inverse_sqrt"
    weight_decay: float = 0.01        # matrices and embeddings only (optim.matrices_only)
    clip: float = 1.0                 # global gradient-norm clipping; 0 turns it off
    freeze: tuple[str, ...] = ()      # train only these names ...
    freeze_steps: int = 0             # ... for the first freeze_steps steps (cross-attention warmup)
    eval_every: int = 100
    save_every: int = 250
    log_every: int = 10

    def __post_init__(self):
        if self.steps <= 0 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("steps and lr must be positive and warmup_steps >= 0")
        if self.schedule not in ("cosine", "inverse_sqrt"):
            raise ValueError(f"schedule must be 'cosine' or 'inverse_sqrt', got {self.schedule!r}")
        if self.freeze_steps and not self.freeze:
            raise ValueError("freeze_steps needs the names to train first (freeze)")

    def lr_schedule(self):
        if self.schedule == "cosine":
            return warmup_cosine(self.lr, self.warmup_steps, self.steps, self.min_lr)
        return warmup_inverse_sqrt(self.lr, self.warmup_steps)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint stands."""


def make_optimizer(model, cfg: TrainConfig):
    trainable = FreezeSchedule(frozenset(cfg.freeze), cfg.freeze_steps) if cfg.freeze_steps else None
    return AdamW(model.params, lr=cfg.lr_schedule(), betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=cfg.weight_decay, trainable=trainable)


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, model, opt, step, cfg, history, extra_files=None):
    """Everything needed to continue, in one atomically written directory."""
    from safetensors.numpy import save as safetensors_bytes
    state = opt.state_dict()
    trainer = {"format": STATE_FORMAT, "step": step, "train_config": dataclasses.asdict(cfg),
               "optimizer": state["meta"], "history": history, "dtype": str(model.dtype)}
    files = dict(extra_files or {})
    files["optimizer.safetensors"] = safetensors_bytes(state["tensors"]) if state["tensors"] else b""
    files["trainer_state.json"] = json.dumps(trainer, indent=1).encode()
    save_tensors(Path(run_dir) / "checkpoint", model.params, model.hf_config(), extra_files=files, overwrite=True)


def load_checkpoint(run_dir, model, opt, cfg):
    """Restore weights (in place) and optimizer state; returns (step, history)."""
    from safetensors.numpy import load as safetensors_load
    ckpt = Path(run_dir) / "checkpoint"
    state_file = ckpt / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"cannot resume: {state_file} is missing (no checkpoint was saved in {run_dir})")
    trainer = json.loads(state_file.read_text())
    if trainer.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_file}: unknown format {trainer.get('format')!r}")
    saved_cfg = trainer["train_config"]
    mine = json.loads(json.dumps(dataclasses.asdict(cfg)))
    # Everything that shapes the updates must match (steps too: it sets the cosine schedule).
    changed = {k for k in mine if k not in ("eval_every", "save_every", "log_every")
               and mine[k] != saved_cfg.get(k)}
    if changed:
        raise CheckpointError(f"cannot resume {run_dir}: training settings differ from the saved run "
                              f"({', '.join(sorted(changed))}); resuming would not continue the same run")
    shapes = {k: v.shape for k, v in model.params.items()}
    weights = load_tensors(ckpt, shapes, model.dtype, ignore=model.tied_names)
    raw = (ckpt / "optimizer.safetensors").read_bytes()
    opt.load_state_dict({"tensors": safetensors_load(raw) if raw else {}, "meta": trainer["optimizer"]})
    for name, array in weights.items():
        model.params[name][...] = array                     # in place: the optimizer holds these arrays
    return trainer["step"], trainer["history"]


# ---------------------------------------------------------------------------- the loop

def train(model, task, cfg: TrainConfig, run_dir, resume=False, label="training", extra_files=None,
          stop_after=None):
    """Train `model` in place on `task` for cfg.steps optimizer steps. Returns the history:
    {"train": [[step, loss, lr, tokens/s], ...], "val": [[step, loss], ...]}.
    `stop_after`: save and stop at that step, as an interruption would (the schedule still
    runs over cfg.steps, so resuming continues the same run)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = make_optimizer(model, cfg)
    step, history = 0, {"train": [], "val": []}
    if resume:
        step, history = load_checkpoint(run_dir, model, opt, cfg)
    elif (run_dir / "checkpoint").exists():
        raise CheckpointError(f"{run_dir} already holds a checkpoint: pass resume to continue it, "
                              "or choose another run directory")
    metrics = open(run_dir / "metrics.jsonl", "a")
    bar = Progress(label, cfg.steps)
    tokens_seen, clock = 0, time.monotonic()
    last_saved = step

    def log(record):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def save(at):
        nonlocal last_saved
        save_checkpoint(run_dir, model, opt, at, cfg, history, extra_files)
        last_saved = at

    try:
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        while step < end:
            batch = task.batch(step)
            loss, grads, tokens = task.loss_and_grads(model, batch)
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"{label}: the loss is {loss} at step {step}; stopped before applying "
                                    f"it. The last good checkpoint (step {last_saved}) is in "
                                    f"{run_dir / 'checkpoint'}. Try a lower --lr or more warmup.")
            names = opt.trainable_names()
            grad_norm = clip_grad_norm(grads, cfg.clip, names) if cfg.clip else float("nan")
            lr = opt.step(grads)
            step += 1
            tokens_seen += tokens
            rate = tokens_seen / max(time.monotonic() - clock, 1e-9)
            if step % cfg.log_every == 0 or step == cfg.steps:
                history["train"].append([step, float(loss), lr, rate])
                log({"step": step, "loss": float(loss), "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": rate, "trainable": len(names)})
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val = evaluate(model, task)
                history["val"].append([step, val])
                log({"step": step, "val_loss": val})
            bar.update(step, loss=float(loss), lr=lr, **{"tok/s": int(rate)})
            if step % cfg.save_every == 0 or step == end:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        save(step)
        print(f"\ninterrupted: saved step {step} to {run_dir / 'checkpoint'}; continue with --resume")
        raise
    finally:
        bar.close()
        metrics.close()
        plot_history(history, run_dir / "loss.png", title=label)
    return history


def evaluate(model, task):
    """Mean validation loss per token over the task's fixed validation batches."""
    total, count = 0.0, 0
    for batch in task.eval_batches():
        loss_sum, tokens = task.eval_loss(model, batch)
        total, count = total + loss_sum, count + tokens
    return total / max(count, 1)


def plot_history(history, path, title="training"):
    """Training loss (thin) and validation loss (markers) against the step."""
    if not history["train"] and not history["val"]:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        t = np.array(history["train"])
        ax.plot(t[:, 0], t[:, 1], lw=1, alpha=0.8, label="train loss")
    if history["val"]:
        v = np.array(history["val"])
        ax.plot(v[:, 0], v[:, 1], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
