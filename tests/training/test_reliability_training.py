"""The training loop under failure: nothing non-finite is saved, no half-applied update is
saved, a resume never repeats metrics, a damaged or different checkpoint is refused by name.

Oracles: the uninterrupted run (weights, and the list of logged steps 1..N once each); the
files on disk (what exists, what it holds); independent reimplementations of nothing: every
expected value here is a fact about the run, not a number the code under test produced.
"""

import json
import os
import signal

import numpy as np
import pytest

from minencdec.files.checkpoint import CheckpointError
from minencdec.model import gemma2
from minencdec.model.presets import preset
from minencdec.training import train as train_module
from minencdec.training.optim import AdamW
from minencdec.training.train import NonFiniteLoss, TrainConfig, train

CONFIG = preset("nano", vocab_size=64, num_hidden_layers=2)
CFG = TrainConfig(steps=8, lr=3e-3, warmup_steps=2, eval_every=4, save_every=2, log_every=1)


class ToyTask:
    """Causal LM on shifted ramps; `at` maps a call number to what goes wrong there:
    "nan-grad" (a NaN in one gradient, the loss finite), "crash" (a RuntimeError: a process
    that dies without its Ctrl-C handler, as kill -9 would)."""

    def __init__(self, at=None):
        self.at, self.calls = dict(at or {}), 0

    def batch(self, step):
        start = np.random.default_rng([0, step]).integers(0, 8, size=(4, 1))
        return (start + np.arange(12)) % 8 + 3

    def loss_and_grads(self, model, ids):
        what, self.calls = self.at.get(self.calls), self.calls + 1
        if what == "crash":
            raise RuntimeError("simulated crash")
        loss, grads = model.loss_and_grads(ids, ids)
        if what == "nan-grad":
            grads[gemma2.EMBED] = grads[gemma2.EMBED].copy()
            grads[gemma2.EMBED][5, 0] = np.nan
        return loss, grads, ids.size

    def eval_batches(self):
        return [self.batch(10_000)]

    def eval_loss(self, model, ids):
        loss, _ = model.loss_and_grads(ids, ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        return float(loss) * n, n


def fresh(dtype="float64"):
    return gemma2.Gemma2Model.random(CONFIG, seed=3, dtype=dtype)


def saved_step(run):
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]


def straight_weights(tmp_path):
    model = fresh()
    train(model, ToyTask(), CFG, tmp_path / "straight")
    return model.params


# ---------------------------------------------------------------------------- non-finite values

@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_an_update_that_makes_weights_non_finite_saves_nothing(tmp_path):
    """lr 1e39 is a finite float, but in float32 the update overflows: every weight becomes
    inf or NaN. With save_every=1 the old loop saved that model as step 1 and returned.
    (min_lr = lr / 10 as the commands set it: one step without warmup runs at min_lr.)"""
    cfg = TrainConfig(steps=1, lr=1e39, min_lr=1e38, warmup_steps=0, eval_every=1, save_every=1, log_every=1)
    with pytest.raises(NonFiniteLoss, match="non-finite.*No checkpoint was saved") as stop:
        train(fresh("float32"), ToyTask(), cfg, tmp_path)
    assert not (tmp_path / "checkpoint").exists()
    assert "step 0)" not in str(stop.value)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        TrainConfig(steps=1, lr=float("inf"), warmup_steps=0)


def test_a_nan_gradient_stops_before_the_update_and_names_the_real_checkpoint(tmp_path):
    model = fresh()
    with pytest.raises(NonFiniteLoss, match=r"gradient norm is nan at step 5.*last good checkpoint \(step 4\)"):
        train(model, ToyTask(at={5: "nan-grad"}), CFG, tmp_path)
    assert saved_step(tmp_path) == 4
    assert all(np.isfinite(p).all() for p in model.params.values())       # never applied
    # Without clipping the norm is computed all the same.
    cfg = TrainConfig(**{**CFG.__dict__, "clip": 0.0})
    with pytest.raises(NonFiniteLoss, match="gradient norm is nan at step 1.*No checkpoint was saved"):
        train(fresh(), ToyTask(at={1: "nan-grad"}), cfg, tmp_path / "noclip")
    assert not (tmp_path / "noclip" / "checkpoint").exists()


def test_nan_loss_before_the_first_save_says_none_was_saved(tmp_path):
    """The old message named 'the last good checkpoint (step 0)', a directory never written."""
    class NanLoss(ToyTask):
        def loss_and_grads(self, model, ids):
            loss, grads, n = super().loss_and_grads(model, ids)
            return (float("nan") if self.calls == 2 else loss), grads, n
    cfg = TrainConfig(steps=4, lr=1e-3, warmup_steps=1, eval_every=4, save_every=100, log_every=1)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 1.*No checkpoint was saved") as stop:
        train(fresh(), NanLoss(), cfg, tmp_path)
    assert "step 0" not in str(stop.value) and not (tmp_path / "checkpoint").exists()


# ---------------------------------------------------------------------------- interruptions

class SignalInUpdate(AdamW):
    """An AdamW that receives SIGINT half way through update number `at` (0-based): the
    signal is sent when the update reads its middle gradient."""
    at = 3

    def step(self, grads):
        if self.step_count != self.at:
            return super().step(grads)
        middle = len(grads) // 2

        class Grads(dict):
            reads = 0

            def __getitem__(self, name):
                Grads.reads += 1
                if Grads.reads == middle:
                    os.kill(os.getpid(), signal.SIGINT)   # Python runs the handler right here
                return super().__getitem__(name)
        return super().step(Grads(grads))


class CutInUpdate(AdamW):
    """An AdamW whose update number `at` is cut off half way by a KeyboardInterrupt (as from
    a handler that is not minencdec's)."""
    at = 3

    def step(self, grads):
        if self.step_count == self.at:
            half = dict(list(grads.items())[: len(grads) // 2])
            for name in half:                            # half of the tensors move ...
                self.params[name] -= 0.01 * np.sign(half[name])
            raise KeyboardInterrupt                      # ... then the interrupt
        return super().step(grads)


def use_optimizer(monkeypatch, cls):
    def make(model, cfg):
        return cls(model.params, lr=cfg.lr_schedule(), betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    monkeypatch.setattr(train_module, "make_optimizer", make)


def test_a_signal_during_an_update_waits_for_it_then_saves_a_whole_step(tmp_path, monkeypatch):
    use_optimizer(monkeypatch, SignalInUpdate)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), ToyTask(), CFG, tmp_path / "run")
    assert saved_step(tmp_path / "run") == 4             # the update it arrived in, finished
    monkeypatch.undo()
    resumed = fresh()
    train(resumed, ToyTask(), CFG, tmp_path / "run", resume=True)
    want = straight_weights(tmp_path)
    assert all(np.array_equal(resumed.params[n], want[n]) for n in want)


def test_a_half_applied_update_is_never_saved(tmp_path, monkeypatch):
    use_optimizer(monkeypatch, CutInUpdate)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), ToyTask(), CFG, tmp_path / "run")
    assert saved_step(tmp_path / "run") == 2             # the last whole checkpoint stands
    monkeypatch.undo()
    resumed = fresh()
    train(resumed, ToyTask(), CFG, tmp_path / "run", resume=True)
    want = straight_weights(tmp_path)
    assert all(np.array_equal(resumed.params[n], want[n]) for n in want)


# ---------------------------------------------------------------------------- resuming

def logged_steps(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x], [x["step"] for x in lines if "val_loss" in x]


def test_a_resume_does_not_repeat_metrics(tmp_path):
    """A crash at step 5 (checkpoint at 4, metrics logged to 5); the resumed run logs 5 again."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(fresh(), ToyTask(at={5: "crash"}), CFG, tmp_path)
    assert saved_step(tmp_path) == 4 and logged_steps(tmp_path)[0] == [1, 2, 3, 4, 5]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.')                # and a line torn by the crash
    train(fresh(), ToyTask(), CFG, tmp_path, resume=True)
    assert logged_steps(tmp_path) == (list(range(1, 9)), [4, 8])


def test_a_resume_with_other_settings_is_refused_naming_each(tmp_path):
    settings = {"batch_size": 8, "seed": 0, "data_sha256": "a" * 64}
    train(fresh(), ToyTask(), CFG, tmp_path, stop_after=4, settings=settings)
    other = {"batch_size": 16, "seed": 0, "data_sha256": "b" * 64}
    with pytest.raises(CheckpointError, match="settings differ") as refused:
        train(fresh(), ToyTask(), CFG, tmp_path, resume=True, settings=other)
    message = str(refused.value)
    assert "batch_size 8 -> 16" in message and "data_sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb..." in message
    assert "seed" not in message
    with pytest.raises(CheckpointError, match="dtype float64 -> float32"):            # the model's own
        train(fresh("float32"), ToyTask(), CFG, tmp_path, resume=True, settings=settings)
    train(fresh(), ToyTask(), CFG, tmp_path, resume=True, settings=settings)        # the same: resumes
    assert saved_step(tmp_path) == 8


@pytest.mark.parametrize("damage, named", [
    (lambda ckpt: (ckpt / "trainer_state.json").write_text('{"format": "minencdec.trainer/1", "st'),
     "trainer_state.json: damaged, not valid JSON"),
    (lambda ckpt: (ckpt / "trainer_state.json").write_text(json.dumps(
        {k: v for k, v in json.loads((ckpt / "trainer_state.json").read_text()).items() if k != "optimizer"})),
     "trainer_state.json: damaged, 'optimizer' is not an object"),
    (lambda ckpt: (ckpt / "optimizer.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"),
     "optimizer.safetensors: damaged"),
    (lambda ckpt: (ckpt / "optimizer.safetensors").unlink(), "optimizer.safetensors: file is missing"),
])
def test_a_damaged_checkpoint_is_refused_by_file_name(tmp_path, damage, named):
    train(fresh(), ToyTask(), CFG, tmp_path, stop_after=4)
    damage(tmp_path / "checkpoint")
    model = fresh()
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(CheckpointError, match=named):
        train(model, ToyTask(), CFG, tmp_path, resume=True)
    assert all(np.array_equal(model.params[k], v) for k, v in before.items())     # untouched


def test_bad_loop_settings_are_refused_up_front():
    for field in ("eval_every", "save_every", "log_every", "steps"):
        with pytest.raises(ValueError, match=f"{field} must be a positive integer, got 0"):
            TrainConfig(**{**CFG.__dict__, field: 0})
    with pytest.raises(ValueError, match=r"warmup_steps \(50\) must be smaller than steps \(10\)"):
        TrainConfig(steps=10, warmup_steps=50)
