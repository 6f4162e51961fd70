"""Training a T5Gemma 2 adapted from a Gemma 3: the objectives, distillation from the source,
the encoder classifier, and a bit-for-bit resume, on a learnable toy language.

Oracles: the loss of a task that can be learned must fall well below its value at step 0;
an interrupted run resumed from its checkpoint equals the uninterrupted run in every weight;
a classifier reaches an accuracy the labels allow and chance does not. (That every gradient
is right is tests/model/test_gemma3_family.py's job: finite differences.)
"""

import numpy as np

from minencdec.model.adapt import adapt_params
from minencdec.model.classify import Classifier
from minencdec.model.config import gemma3_config
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel
from minencdec.training.tasks import ClassificationTask, Seq2SeqTask
from minencdec.training.train import TrainConfig, evaluate, train

SOURCE = gemma3_config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                       max_position_embeddings=64)


def rows(n, seed):
    """Rows counting up from a random start (mod 8): learnable in a few dozen steps."""
    start = np.random.default_rng(seed).integers(0, 8, (n, 1))
    return (start + np.arange(16)) % 8 + 4                        # (n, 16)


def adapted(seed=0, source=SOURCE):
    teacher = Gemma2Model.random(source, seed=seed, dtype="float32")
    config, params, _ = adapt_params(teacher.params, source, teacher.params, source)
    return teacher, T5GemmaModel(config, params, "float32")


def test_prefixlm_learns_and_prefixlm_kd_trains(tmp_path):
    teacher, model = adapted()
    task = Seq2SeqTask("prefixlm", rows(256, 1), rows(16, 2), batch_size=8)
    before = evaluate(model, task)
    cfg = TrainConfig(steps=120, lr=3e-3, warmup_steps=10, eval_every=60, save_every=60)
    train(model, task, cfg, tmp_path / "run")
    after = evaluate(model, task)
    assert after < 0.5 * before, (before, after)
    kd = Seq2SeqTask("prefixlm-kd", rows(64, 3), rows(16, 2), batch_size=8, teacher=teacher)
    _, student = adapted()
    start = evaluate(student, kd)
    train(student, kd, TrainConfig(steps=20, lr=1e-2, warmup_steps=2, eval_every=20, save_every=20), tmp_path / "kd")
    assert np.isfinite(evaluate(student, kd)) and evaluate(student, kd) != start


def test_resume_is_bit_for_bit(tmp_path):
    cfg = TrainConfig(steps=12, lr=5e-3, warmup_steps=2, eval_every=6, save_every=6)
    task = Seq2SeqTask("prefixlm", rows(64, 4), rows(8, 5), batch_size=4)
    _, straight = adapted()
    train(straight, task, cfg, tmp_path / "a")
    _, first = adapted()
    train(first, task, cfg, tmp_path / "b", stop_after=6)
    _, second = adapted()                                         # a fresh process's model
    train(second, task, cfg, tmp_path / "b", resume=True)
    for name in straight.params:
        assert np.array_equal(straight.params[name], second.params[name]), name


def test_encoder_classifier_learns(tmp_path):
    full = SOURCE.replace(layer_types=("full_attention",) * 2)    # the last token must see the first
    _, model = adapted(source=full)
    clf = Classifier.from_model(model, 2, seed=0)
    rng = np.random.default_rng(6)
    ids = rng.integers(4, 12, (1000, 10))                         # 8 symbols: each seen often
    labels = (ids[:, 0] >= 8).astype(int)                         # the first token decides
    data = list(zip(ids, labels))
    task = ClassificationTask(data[:900], data[900:], batch_size=16)
    train(clf, task, TrainConfig(steps=300, lr=1e-2, warmup_steps=5, eval_every=100, save_every=300), tmp_path / "c")
    accuracy = np.mean(np.argmax(clf.logits(ids[900:]), -1) == labels[900:])   # held out: chance is ~0.5
    assert accuracy >= 0.9, accuracy
