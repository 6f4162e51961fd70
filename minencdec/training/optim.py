"""AdamW with parameter freezing, global-norm gradient clipping and learning-rate schedules.

Parameters and gradients are dicts keyed by the checkpoint's tensor names, so a
step is a loop over keys. For each trainable parameter p with gradient g, at its own step t:

    p  = p - lr wd p                      decoupled weight decay (Loshchilov & Hutter), first
    m  = b1 m + (1 - b1) g
    v  = b2 v + (1 - b2) g^2
    p  = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)      eps outside the sqrt

exactly as torch.optim.AdamW (no amsgrad). Every parameter has its own m, v and t, so one
that starts training late (after a freeze) begins with its own bias correction, as in torch.

What decays (`no_decay`, default `matrices_only`): weight decay shrinks a tensor toward zero,
which regularises the matrices that mix features: attention and MLP projections, and the
embeddings, because the decoder's embedding is also the tied LM head (nanoGPT decays its
tied embedding for the same reason). One-dimensional tensors do not decay: Gemma's RMSNorm
weights are offsets (scale = 1 + w), so decay would pull every scale toward 1 and fight the
normalisation, and biases (the classification head's) only shift; they are few and are not
where overfitting lives (the exclusion nanoGPT and transformers' Trainer make).

Freezing (`trainable`): None trains everything; a set of names, or a predicate name -> bool,
trains those; a `FreezeSchedule(names, steps)` trains only `names` for the first `steps`
optimizer steps and then everything: the unbalanced pair's cross-attention warmup. A frozen
parameter gets no update, no weight decay and no state change.

The learning rate and the freeze schedule are pure functions of the optimizer's step count,
so `state_dict()` (m, v, the step counts) is all a resume needs to continue bit for bit.

`backend="numba"` runs each tensor's update as one fused pass (fastpath/optim.py) instead of
NumPy's ten, with no temporaries (a 262,144 x 640 embedding's would be 0.67 GB each); its
arithmetic rounds line by line as the loop below does, so both backends give the same bits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Collection

import numpy as np

from minencdec.model.backend import check_backend
from minencdec.model.backend import kernels as backend_kernels


def matrices_only(name, p) -> bool:
    """The default `no_decay` rule: True (do not decay) for 1-D tensors, RMSNorm weights and
    biases; matrices and embeddings decay. See the module docstring for why."""
    return p.ndim < 2


@dataclasses.dataclass(frozen=True)
class FreezeSchedule:
    """Train only `names` for the first `steps` optimizer steps (steps 0 .. steps-1), then all."""

    names: frozenset
    steps: int

    def __post_init__(self):
        object.__setattr__(self, "names", frozenset(self.names))
        if self.steps < 0:
            raise ValueError(f"FreezeSchedule: steps must be >= 0, got {self.steps}")

    def trainable_at(self, step) -> Callable[[str], bool]:
        return (lambda name: name in self.names) if step < self.steps else (lambda name: True)


class AdamW:
    """AdamW over `params` (name -> array, updated in place). See the module docstring.

    lr: a number or a schedule `lr_at(step) -> float` (step = updates done before this one).
    backend: "numpy" (the loop below) or "numba" (one fused pass per tensor, the same bits).
    """

    def __init__(self, params: dict, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 no_decay: Callable[[str, np.ndarray], bool] = matrices_only, trainable=None, backend="numpy"):
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"AdamW: betas must be in [0, 1), got {betas}")
        if eps < 0 or weight_decay < 0:
            raise ValueError(f"AdamW: eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.params, self.lr, self.trainable = params, lr, trainable
        self.beta1, self.beta2, self.eps, self.weight_decay = float(betas[0]), float(betas[1]), float(eps), float(weight_decay)
        self.decays = {name: not no_decay(name, p) for name, p in params.items()}
        self.step_count = 0              # optimizer steps taken; drives lr and freeze schedules
        self.state = {}                  # name -> {"step": int, "exp_avg": m, "exp_avg_sq": v}
        self.backend = check_backend(backend)
        self.trainable_names()           # check the trainable names now, not at the first step

    def lr_now(self) -> float:
        """The learning rate the next step will use."""
        return float(self.lr(self.step_count) if callable(self.lr) else self.lr)

    def trainable_names(self) -> list[str]:
        """The parameters the next step will update (pass these to clip_grad_norm)."""
        rule = self.trainable
        if rule is None:
            return list(self.params)
        if isinstance(rule, FreezeSchedule):
            _check_known(rule.names, self.params, "FreezeSchedule")
            rule = rule.trainable_at(self.step_count)
        elif not callable(rule):                      # a collection of names
            names = set(rule)
            _check_known(names, self.params, "trainable")
            rule = names.__contains__
        return [name for name in self.params if rule(name)]

    def step(self, grads: dict) -> float:
        """One update of every trainable parameter, in place; returns the learning rate used.
        `grads` must hold every trainable name; gradients of frozen parameters are ignored."""
        unknown = [name for name in grads if name not in self.params]
        if unknown:
            raise KeyError(f"AdamW: gradients for unknown parameters: {_few(unknown)}")
        names = self.trainable_names()
        missing = [name for name in names if grads.get(name) is None]
        if missing:
            raise KeyError(f"AdamW: no gradient for trainable parameters: {_few(missing)}")
        lr, b1, b2 = self.lr_now(), self.beta1, self.beta2
        for name in names:
            p, g = self.params[name], grads[name]
            if g.shape != p.shape:
                raise ValueError(f"AdamW: gradient of {name} has shape {g.shape}, the parameter {p.shape}")
            if name not in self.state:                             # (not setdefault: it would build two
                self.state[name] = {"step": 0, "exp_avg": np.zeros_like(p),   # zero tensors every step)
                                    "exp_avg_sq": np.zeros_like(p)}
            s = self.state[name]
            m, v = s["exp_avg"], s["exp_avg_sq"]
            s["step"] += 1
            t = s["step"]
            decay = 1.0 - lr * self.weight_decay if self.decays[name] else None
            step_size, bc2 = lr / (1.0 - b1**t), math.sqrt(1.0 - b2**t)
            if self.backend == "numba" and _fusable(p, g, m, v):
                backend_kernels("numba").adamw_update(p, g, m, v, 1.0 if decay is None else decay, b1, b2,
                                                      step_size, bc2, self.eps)
                continue
            if decay is not None:
                p *= decay                                         # decoupled: not through m, v
            m *= b1
            m += (1.0 - b1) * g                                    # m = b1 m + (1 - b1) g
            v *= b2
            v += (1.0 - b2) * (g * g)                              # v = b2 v + (1 - b2) g^2
            denom = np.sqrt(v) / bc2 + self.eps                    # eps outside the sqrt
            p -= step_size * (m / denom)
        self.step_count += 1
        return lr

    # ---------------------------------------------------------------- checkpointing

    def state_dict(self, copy=True) -> dict:
        """{"tensors": name -> array (for safetensors), "meta": plain JSON-able values}.
        Tensor names are "exp_avg/<param>" and "exp_avg_sq/<param>"; arrays are copies, or
        with copy=False the optimizer's own arrays (for a save that writes them before the
        next step: no second copy of the moments in memory)."""
        tensors = {f"{key}/{name}": s[key].copy() if copy else s[key] for name, s in self.state.items()
                   for key in ("exp_avg", "exp_avg_sq")}
        meta = {"format": "minencdec.AdamW/1", "step_count": self.step_count,
                "param_steps": {name: s["step"] for name, s in self.state.items()},
                "betas": [self.beta1, self.beta2], "eps": self.eps, "weight_decay": self.weight_decay}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(); everything is checked before anything changes."""
        tensors, meta = state["tensors"], state["meta"]
        if meta.get("format") != "minencdec.AdamW/1":
            raise ValueError(f"optimizer state: unknown format {meta.get('format')!r}")
        for key, mine in [("betas", [self.beta1, self.beta2]), ("eps", self.eps), ("weight_decay", self.weight_decay)]:
            if meta[key] != mine:
                raise ValueError(f"optimizer state: {key} {meta[key]} was saved, this optimizer has {mine}; "
                                 f"resuming with other hyperparameters would not continue the same run")
        steps = meta["param_steps"]
        unknown = [name for name in steps if name not in self.params]
        if unknown:
            raise KeyError(f"optimizer state for unknown parameters: {_few(unknown)}")
        expected = {f"{key}/{name}" for name in steps for key in ("exp_avg", "exp_avg_sq")}
        if set(tensors) != expected:
            raise KeyError(f"optimizer state: tensors missing {_few(sorted(expected - set(tensors)))}, "
                           f"unexpected {_few(sorted(set(tensors) - expected))}")
        for key in expected:
            p = self.params[key.split("/", 1)[1]]
            if tensors[key].shape != p.shape or tensors[key].dtype != p.dtype:
                raise ValueError(f"optimizer state {key} is {tensors[key].dtype}{tensors[key].shape}, "
                                 f"the parameter is {p.dtype}{p.shape}")
        self.step_count = int(meta["step_count"])
        self.state = {name: {"step": int(t), "exp_avg": np.array(tensors[f"exp_avg/{name}"]),
                             "exp_avg_sq": np.array(tensors[f"exp_avg_sq/{name}"])} for name, t in steps.items()}


def clip_grad_norm(grads: dict, max_norm, names=None) -> float:
    """Scale grads[names] in place so their global L2 norm is at most max_norm; return the
    norm before clipping (as torch.nn.utils.clip_grad_norm_: scale = max_norm / (norm + 1e-6)
    when that is < 1). names None means every gradient; pass the trainable names so frozen
    gradients neither count nor change. A non-finite norm leaves the gradients untouched and
    is returned: the caller must stop the run on it."""
    names = list(grads) if names is None else list(names)
    total = global_norm(grads, names)
    scale = max_norm / (total + 1e-6)
    if math.isfinite(total) and scale < 1.0:
        for n in names:
            grads[n] *= scale
    return total


def global_norm(grads: dict, names=None) -> float:
    """The L2 norm of grads[names] taken together (every gradient when names is None), in float64."""
    names = list(grads) if names is None else names
    return math.sqrt(sum(_sum_of_squares(grads[n]) for n in names))


_BLOCK = 1 << 20


def _sum_of_squares(g) -> float:
    """sum(g^2) in float64, a block of 2^20 numbers at a time: a float64 copy of a whole
    262,144 x 640 embedding gradient would be 1.3 GB, the step's largest allocation."""
    flat = np.asarray(g).reshape(-1)
    return sum(float(np.sum(np.square(flat[i:i + _BLOCK], dtype=np.float64))) for i in range(0, flat.size, _BLOCK))


def _fusable(p, *others) -> bool:
    """The fused update covers C-contiguous float32 / float64 tensors of one dtype."""
    return p.dtype in (np.float32, np.float64) and all(
        a.dtype == p.dtype and a.flags.c_contiguous and a.shape == p.shape for a in (p,) + others)


# ---------------------------------------------------------------------- learning-rate schedules
# Each returns lr_at(step), a pure function of step = the number of updates done before this
# one (0 for the first). With t = step + 1, warmup is linear over t = 1 .. W and reaches the
# peak at t = W (step W - 1), so no step is wasted at lr 0.

def warmup_cosine(peak_lr, warmup_steps, total_steps, min_lr=0.0) -> Callable[[int], float]:
    """Linear warmup to peak_lr, then half a cosine down to min_lr at t = total_steps; min_lr after."""
    if not 0 <= warmup_steps < total_steps or not 0 <= min_lr <= peak_lr:
        raise ValueError(f"warmup_cosine: need 0 <= warmup {warmup_steps} < total {total_steps} "
                         f"and 0 <= min_lr {min_lr} <= peak_lr {peak_lr}")

    def lr_at(step):
        t = step + 1
        if t <= warmup_steps:
            return peak_lr * t / warmup_steps
        progress = min(1.0, (t - warmup_steps) / (total_steps - warmup_steps))
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr_at


def warmup_inverse_sqrt(peak_lr, warmup_steps) -> Callable[[int], float]:
    """Linear warmup to peak_lr at t = W, then peak_lr sqrt(W / t) (T5's, fairseq's decay)."""
    if warmup_steps < 1 or peak_lr < 0:
        raise ValueError(f"warmup_inverse_sqrt: need warmup_steps >= 1 and peak_lr >= 0, "
                         f"got {warmup_steps}, {peak_lr}")

    def lr_at(step):
        t = step + 1
        return peak_lr * t / warmup_steps if t <= warmup_steps else peak_lr * math.sqrt(warmup_steps / t)
    return lr_at


def _check_known(names: Collection[str], params: dict, what: str) -> None:
    unknown = sorted(n for n in names if n not in params)
    if unknown:
        raise KeyError(f"{what}: names that are not parameters: {_few(unknown)}")


def _few(names, limit=8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
