"""The training loop: bit-for-bit resume, NaN stop, Ctrl-C save, refusal to clobber a run.

The oracle for resuming is the uninterrupted run itself: 2N steps straight must equal
N steps, a fresh process state, and N more, in every loss and every weight.
"""

import json

import numpy as np
import pytest

from minencdec.model import gemma2
from minencdec.files.checkpoint import CheckpointError
from minencdec.model.presets import preset
from minencdec.training.train import NonFiniteLoss, TrainConfig, train

CONFIG = preset("nano", vocab_size=64, num_hidden_layers=2)


class ToyTask:
    """Causal LM on a repeating pattern, batches a pure function of (seed, step)."""

    def __init__(self, seed=0, nan_at=None, interrupt_at=None):
        self.seed, self.nan_at, self.interrupt_at = seed, nan_at, interrupt_at

    def batch(self, step):
        rng = np.random.default_rng([self.seed, step])
        start = rng.integers(0, 8, size=(4, 1))
        return (start + np.arange(12)) % 8 + 3                   # 3 4 5 ... : easy to learn

    def loss_and_grads(self, model, ids):
        if self.interrupt_at is not None and self.calls_at(model) == self.interrupt_at:
            raise KeyboardInterrupt
        loss, grads = model.loss_and_grads(ids, ids)
        if self.nan_at is not None and self.calls_at(model) == self.nan_at:
            loss = float("nan")
        return loss, grads, ids.size

    def calls_at(self, model):
        model.calls = getattr(model, "calls", 0) + 1
        return model.calls - 1

    def eval_batches(self):
        return [self.batch(10_000 + i) for i in range(2)]

    def eval_loss(self, model, ids):
        loss, _ = model.loss_and_grads(ids, ids)
        n = ids.shape[0] * (ids.shape[1] - 1)
        return loss * n, n


def fresh_model():
    return gemma2.Gemma2Model.random(CONFIG, seed=3, dtype="float64")


CFG = TrainConfig(steps=12, lr=3e-3, warmup_steps=3, eval_every=4, save_every=6, log_every=1)


def test_resume_is_bit_for_bit(tmp_path):
    straight = fresh_model()
    h_straight = train(straight, ToyTask(), CFG, tmp_path / "a")
    train(fresh_model(), ToyTask(), CFG, tmp_path / "b", stop_after=5)   # not at a save_every step
    resumed = fresh_model()                                      # as a new process would start
    h_resumed = train(resumed, ToyTask(), CFG, tmp_path / "b", resume=True)
    assert [r[1] for r in h_resumed["train"]] == [r[1] for r in h_straight["train"]]
    assert h_resumed["val"] == h_straight["val"]
    for name in straight.params:
        assert np.array_equal(resumed.params[name], straight.params[name]), name
    # Negative control: a different data seed after the resume point does change the weights.
    other = fresh_model()
    train(other, ToyTask(), CFG, tmp_path / "c", stop_after=6)
    train(other, ToyTask(seed=1), CFG, tmp_path / "c", resume=True)
    assert not np.array_equal(other.params[gemma2.EMBED], straight.params[gemma2.EMBED])


def test_loss_falls_and_files_are_written(tmp_path):
    history = train(fresh_model(), ToyTask(), TrainConfig(steps=40, lr=1e-2, warmup_steps=5, eval_every=20,
                                                          save_every=40), tmp_path)
    assert history["val"][-1][1] < 0.5 * history["val"][0][1] or history["val"][-1][1] < 1.0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in x for x in lines) and any("tokens_per_s" in x for x in lines)
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 40
    assert gemma2.Gemma2Model  # the checkpoint is a model directory:
    from minencdec.io.pretrained import load_pretrained
    assert load_pretrained(tmp_path / "checkpoint").config == CONFIG


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = fresh_model()
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 8.*last good checkpoint \\(step 6\\)"):
        train(model, ToyTask(nan_at=8), CFG, tmp_path)
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    # The in-memory model stopped before the bad step: it equals an 8-step run.
    ref = fresh_model()
    train(ref, ToyTask(), CFG, tmp_path / "ref", stop_after=8)
    assert all(np.array_equal(model.params[n], ref.params[n]) for n in ref.params)


def test_ctrl_c_saves_the_completed_step(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), ToyTask(interrupt_at=4), CFG, tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    resumed = fresh_model()
    train(resumed, ToyTask(), CFG, tmp_path, resume=True)
    straight = fresh_model()
    train(straight, ToyTask(), CFG, tmp_path / "straight")
    assert all(np.array_equal(resumed.params[n], straight.params[n]) for n in straight.params)


def test_refuses_to_clobber_or_to_resume_other_settings(tmp_path):
    train(fresh_model(), ToyTask(), CFG, tmp_path, stop_after=6)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(fresh_model(), ToyTask(), CFG, tmp_path)
    with pytest.raises(CheckpointError, match="settings differ.*lr"):
        train(fresh_model(), ToyTask(), TrainConfig(**{**CFG.__dict__, "lr": 1e-2}), tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="trainer_state.json is missing"):
        train(fresh_model(), ToyTask(), CFG, tmp_path / "empty", resume=True)
