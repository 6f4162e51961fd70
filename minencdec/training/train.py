"""The training loop: resumable bit for bit, nothing lost, nothing bad saved, progress and plots.

    run = train(model, task, TrainConfig(steps=1000), "runs/x")          # or resume=True

A *task* knows its data and objective; the loop knows nothing of either:

    task.batch(step)           -> the training batch of optimizer step `step` (a pure
                                  function of the task's seed and `step`: that is what
                                  makes resuming exact, with no data-loader state to save)
    task.loss_and_grads(model, batch) -> (loss, grads, tokens)
    task.eval_batches()        -> the fixed validation batches
    task.eval_loss(model, batch) -> (summed loss, tokens)

The run directory holds

    .lock                      locked while a process writes the run (rundir.py)
    checkpoint/                a Hugging Face model directory (transformers loads it) plus
        optimizer.safetensors  AdamW's m and v
        trainer_state.json     step, config, run settings, optimizer counters, metrics so far
        tokenizer.model        when the task has a tokenizer
    metrics.jsonl              one JSON line per logged step and per validation
    loss.png                   training and validation loss curves

What is promised:
- The checkpoint directory is written atomically (a temporary directory, then a rename), so
  a crash during a save leaves the previous checkpoint whole.
- Nothing non-finite is saved. A NaN or infinite loss or gradient norm stops the run before
  the update; an update that leaves a weight or an AdamW moment non-finite stops it before
  anything can save that model. The error names the last checkpoint really written, or says
  that none was.
- Ctrl-C and SIGTERM save the current (completed) step, then exit; a signal that arrives
  while an update is being applied waits for the update to finish (signals.py).
- One process per run directory; a resume continues the same run or is refused, and
  metrics.jsonl drops the lines logged after the checkpoint, which the run logs again
  (rundir.py).
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
from minencdec.io.progress import Progress

from .optim import AdamW, FreezeSchedule, clip_grad_norm, global_norm, warmup_cosine, warmup_inverse_sqrt
from .rundir import (CHECKPOINT_DIR, METRICS_FILE, STATE_FILE, STATE_FORMAT, check_start, digest_bytes, locked,
                     read_state, refuse_other_settings, trim_metrics)
from .signals import StopSignals, Terminated

OPTIMIZER_FILE = "optimizer.safetensors"


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
        for name in ("steps", "eval_every", "save_every", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "freeze_steps"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig: lr must be a positive finite number, got {self.lr!r}")
        for name in ("min_lr", "weight_decay", "clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if self.schedule not in ("cosine", "inverse_sqrt"):
            raise ValueError(f"schedule must be 'cosine' or 'inverse_sqrt', got {self.schedule!r}")
        if self.schedule == "cosine" and self.warmup_steps >= self.steps:
            raise ValueError(f"TrainConfig: warmup_steps ({self.warmup_steps}) must be smaller than steps "
                             f"({self.steps}): the cosine schedule warms up, then decays over the steps left")
        if self.freeze_steps and not self.freeze:
            raise ValueError("freeze_steps needs the names to train first (freeze)")
        self.lr_schedule()                              # the schedule's own checks (min_lr <= lr, ...)

    def lr_schedule(self):
        if self.schedule == "cosine":
            return warmup_cosine(self.lr, self.warmup_steps, self.steps, self.min_lr)
        return warmup_inverse_sqrt(self.lr, self.warmup_steps)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class NonFiniteLoss(RuntimeError):
    """The loss, the gradient or an updated weight became NaN or infinite. The run stopped;
    nothing of the bad step was saved, and the message names the last checkpoint."""


def make_optimizer(model, cfg: TrainConfig):
    trainable = FreezeSchedule(frozenset(cfg.freeze), cfg.freeze_steps) if cfg.freeze_steps else None
    return AdamW(model.params, lr=cfg.lr_schedule(), betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=cfg.weight_decay, trainable=trainable, backend=model.backend)


def model_settings(model) -> dict:
    """The settings a model brings to a run: its config (as a hash) and its dtype."""
    config = json.dumps(model.hf_config(), sort_keys=True).encode()
    return {"model_config_sha256": digest_bytes(config), "dtype": str(np.dtype(model.dtype))}


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir, model, opt, step, cfg, history, extra_files=None, settings=None):
    """Everything needed to continue, in one atomically written directory."""
    state = opt.state_dict(copy=False)                 # written out below, before any update
    trainer = {"format": STATE_FORMAT, "step": step, "train_config": dataclasses.asdict(cfg),
               "settings": settings or {}, "optimizer": state["meta"], "history": history,
               "dtype": str(model.dtype)}
    files = dict(extra_files or {})
    tensors = {}
    if state["tensors"]:
        tensors[OPTIMIZER_FILE] = state["tensors"]
    else:
        files[OPTIMIZER_FILE] = b""                    # an optimizer with no state yet (step 0)
    files[STATE_FILE] = json.dumps(trainer, indent=1).encode()
    save_tensors(Path(run_dir) / CHECKPOINT_DIR, model.params, model.hf_config(), extra_files=files,
                 extra_tensors=tensors, overwrite=True)   # the run's own checkpoint: replaced every save


def load_checkpoint(run_dir, model, opt, cfg, settings=None):
    """Restore weights (in place) and optimizer state; returns (step, history). Every file is
    read and checked, and the settings compared, before the model or optimizer changes."""
    from safetensors.numpy import load as safetensors_load
    state = read_state(run_dir)
    refuse_other_settings(run_dir, state, dataclasses.asdict(cfg), settings or {})
    ckpt = Path(run_dir) / CHECKPOINT_DIR
    shapes = {k: v.shape for k, v in model.params.items()}
    weights = load_tensors(ckpt, shapes, model.dtype, ignore=model.tied_names)
    opt_file = ckpt / OPTIMIZER_FILE
    if not opt_file.is_file():
        raise CheckpointError(f"{opt_file}: file is missing; the checkpoint cannot be resumed")
    raw = opt_file.read_bytes()
    try:
        tensors = safetensors_load(raw) if raw else {}
    except Exception as e:                                # safetensors raises its own error type
        raise CheckpointError(f"{opt_file}: damaged, not a readable safetensors file ({e})") from None
    meta = state["optimizer"]
    if meta.get("step_count") != state["step"]:
        raise CheckpointError(f"{ckpt / STATE_FILE}: damaged, the optimizer counted {meta.get('step_count')!r} "
                              f"steps but the checkpoint is at step {state['step']}")
    try:
        opt.load_state_dict({"tensors": tensors, "meta": meta})
    except (KeyError, TypeError, ValueError) as e:
        detail = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{opt_file}: does not fit this model and optimizer ({detail})") from None
    for name, array in weights.items():
        model.params[name][...] = array                     # in place: the optimizer holds these arrays
    return state["step"], state["history"]


# ---------------------------------------------------------------------------- the loop

def train(model, task, cfg: TrainConfig, run_dir, resume=False, label="training", extra_files=None,
          stop_after=None, settings=None):
    """Train `model` in place on `task` for cfg.steps optimizer steps. Returns the history:
    {"train": [[step, loss, lr, tokens/s], ...], "val": [[step, loss], ...]}.
    `stop_after`: save and stop at that step, as an interruption would (the schedule still
    runs over cfg.steps, so resuming continues the same run). `settings`: the run's own
    settings that change the numbers (name -> JSON value: batch size, seed, a hash of the
    data, ...), stored in the checkpoint; a resume with different ones is refused."""
    run_dir = Path(run_dir)
    settings = {**model_settings(model), **(settings or {})}
    with locked(run_dir), StopSignals() as signals:
        check_start(run_dir, resume)
        opt = make_optimizer(model, cfg)
        step, history, last_saved = 0, {"train": [], "val": []}, None
        if resume:
            step, history = load_checkpoint(run_dir, model, opt, cfg, settings)
            last_saved = step
            dropped = trim_metrics(run_dir / METRICS_FILE, step)
            if dropped:
                print(f"{run_dir / METRICS_FILE}: dropped {dropped} line(s) logged after the checkpoint "
                      f"(step {step}); the resumed run logs them again")
        return _loop(model, task, cfg, run_dir, opt, step, history, last_saved, signals, label,
                     extra_files, stop_after, settings)


def _loop(model, task, cfg, run_dir, opt, step, history, last_saved, signals, label, extra_files,
          stop_after, settings):
    metrics = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
    bar = Progress(label, cfg.steps)
    tokens_seen, clock = 0, time.monotonic()
    applying = False                  # from the start of an update until its checks passed

    def log(record):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def save(at):
        nonlocal last_saved
        save_checkpoint(run_dir, model, opt, at, cfg, history, extra_files, settings)
        last_saved = at

    def stop(problem):
        where = (f"The last good checkpoint (step {last_saved}) is in {run_dir / CHECKPOINT_DIR}"
                 if last_saved is not None else f"No checkpoint was saved in {run_dir} (the run stopped "
                 "before its first save)")
        raise NonFiniteLoss(f"{label}: {problem}. {where}. Try a lower --lr or more warmup.")

    try:
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        while step < end:
            batch = task.batch(step)
            loss, grads, tokens = task.loss_and_grads(model, batch)
            if not math.isfinite(loss):
                stop(f"the loss is {loss} at step {step}; stopped before applying it")
            names = opt.trainable_names()
            grad_norm = clip_grad_norm(grads, cfg.clip, names) if cfg.clip else global_norm(grads, names)
            if not math.isfinite(grad_norm):
                stop(f"the gradient norm is {grad_norm} at step {step} (loss {loss:.4g}); stopped before "
                     "applying it")
            applying = True
            with signals.held():
                lr = opt.step(grads)
                if (bad := _first_non_finite(model, opt, names)) is not None:
                    stop(f"the update at step {step} (lr {lr:.3g}) made {bad} non-finite; nothing was saved "
                         "after it and the model in memory is unusable")
                applying = False
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
    except KeyboardInterrupt as e:
        bar.close()
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        if applying:              # an update was cut off half way: that model is no step at all
            print(f"\n{what} during an update: not saved; the last checkpoint is step {last_saved}")
        else:
            save(step)
            print(f"\n{what}: saved step {step} to {run_dir / CHECKPOINT_DIR}; continue with --resume")
        raise
    finally:
        bar.close()
        metrics.close()
        plot_history(history, run_dir / "loss.png", title=label)
    return history


def _first_non_finite(model, opt, names):
    """The first trained tensor (weight, or AdamW moment) holding a NaN or an infinity, else None."""
    for name in names:
        if not np.isfinite(model.params[name]).all():
            return name
        moments = opt.state.get(name, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments and not np.isfinite(moments[key]).all():
                return f"AdamW's {key} of {name}"
    return None


def evaluate(model, task):
    """Mean validation loss per token over the task's fixed validation batches."""
    total, count = 0.0, 0
    for batch in task.eval_batches():
        loss_sum, tokens = task.eval_loss(model, batch)
        total, count = total + loss_sum, count + tokens
    return float(total / max(count, 1))          # a NumPy scalar would not go into metrics.jsonl


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
