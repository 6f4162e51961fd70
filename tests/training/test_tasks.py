"""The objective glue and the training commands, on small text the tests make themselves.

Oracles: the teacher/student alignment of PrefixLM+KD is checked against the teacher's own
loss computed another way; the whole distillation step against finite differences; the
commands end to end (pretrain -> adapt -> train -> finetune -> generate) on a generated
corpus, with the loss falling; bad input errors before training starts.
"""

import json
import shutil

import numpy as np
import pytest

import cases
from helpers import RTOL_F64, assert_close, gradcheck
from minencdec import cli
from minencdec.model import gemma2, t5gemma
from minencdec.model.adapt import adapt_params
from minencdec.model.losses import cross_entropy_forward
from minencdec.training.tasks import Seq2SeqTask

SMALL = cases.GEMMA2_CASES["gqa_odd"]


def kd_setup():
    teacher = gemma2.Gemma2Model(SMALL, cases.random_params(gemma2.param_shapes(SMALL), 1), "float64")
    config, params, _ = adapt_params(teacher.params, SMALL, teacher.params, SMALL, "copy")
    # adapt_params shares the teacher's arrays; the student trains, so it gets its own copies.
    student = t5gemma.T5GemmaModel(config, {k: v.copy() for k, v in params.items()}, "float64")
    rows = np.random.default_rng(0).integers(3, 64, (6, 10))
    return teacher, student, rows


def test_teacher_logits_line_up_with_the_student_targets():
    """The sliced teacher logits scored on the labels must equal the teacher's own causal-LM
    loss on the second half of each row (labels -100 on the first half: another route)."""
    teacher, student, rows = kd_setup()
    task = Seq2SeqTask("prefixlm-kd", rows, rows, 3, teacher=teacher)
    batch = task.batch(0)
    r, input_ids, _, labels = batch
    k = input_ids.shape[1]
    sliced = teacher.logits(r)[:, k - 1:k - 1 + labels.shape[1]]
    via_slice, _ = cross_entropy_forward(sliced, labels)
    masked = r.astype(np.int64).copy()
    masked[:, :k] = -100                                          # only the second half is scored
    via_model, _ = teacher.loss_and_grads(r, masked)
    assert_close("teacher loss on the targets", via_slice, via_model, RTOL_F64)
    # Negative control: off by one position, the two routes disagree.
    shifted, _ = cross_entropy_forward(teacher.logits(r)[:, k:k + labels.shape[1] - 1], labels[:, :-1])
    assert abs(shifted - via_model) > 1e-3


def test_distillation_step_against_finite_differences():
    teacher, student, rows = kd_setup()
    task = Seq2SeqTask("prefixlm-kd", rows, rows, 3, teacher=teacher, temperature=2.0, alpha=0.7)
    batch = task.batch(0)
    _, grads, _ = task.loss_and_grads(student, batch)
    rng = np.random.default_rng(0)
    for name in ["model.encoder.layers.1.mlp.up_proj.weight", "model.decoder.layers.0.cross_attn.k_proj.weight",
                 "model.decoder.embed_tokens.weight", "model.encoder.norm.weight"]:
        gradcheck(name, lambda: task.loss_and_grads(student, batch)[0], student.params[name], grads[name], rng)
    teacher_before = {k: v.copy() for k, v in teacher.params.items()}
    task.loss_and_grads(student, batch)
    assert all(np.array_equal(teacher.params[k], v) for k, v in teacher_before.items())


def corpus(path, lines=400, seed=0):
    """English-looking text with structure a tiny model can learn."""
    rng = np.random.default_rng(seed)
    who = ["the king", "a fool", "my lord", "the queen", "good sir", "this knave"]
    verbs = ["doth love", "shall see", "hath slain", "will follow", "must answer"]
    what = ["the crown.", "his friend.", "the night.", "our cause.", "thy father."]
    text = "\n".join(f"{who[rng.integers(6)].capitalize()} {verbs[rng.integers(5)]} {what[rng.integers(5)]}"
                     for _ in range(lines))
    path.write_text(text)
    return path


COMMON = ["--steps", "30", "--batch-size", "8", "--seq-len", "32", "--eval-every", "10", "--save-every", "30",
          "--warmup", "5", "--dtype", "float32"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """pretrain -> adapt -> train (prefixlm-kd), all through the command line."""
    tmp = tmp_path_factory.mktemp("runs")
    text = corpus(tmp / "corpus.txt")
    assert cli.main(["pretrain", "--out", str(tmp / "pre"), "--data", str(text), "--preset", "nano",
                     "--vocab-size", "500", "--lr", "1e-2", *COMMON]) == 0
    assert cli.main(["adapt", "--encoder-from", str(tmp / "pre" / "checkpoint"),
                     "--decoder-from", str(tmp / "pre" / "checkpoint"), "--out", str(tmp / "t5")]) == 0
    assert cli.main(["train", "--model", str(tmp / "t5"), "--objective", "prefixlm-kd", "--out", str(tmp / "kd"),
                     "--data", str(text), "--lr", "3e-3", *COMMON]) == 0
    return tmp, text


def history(run):
    return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["history"]


def test_loss_falls_on_real_looking_text(pipeline):
    tmp, _ = pipeline
    val = history(tmp / "pre")["val"]
    assert val[-1][1] < val[0][1] - 1.0, f"held-out loss did not fall: {val}"
    assert (tmp / "pre" / "loss.png").exists() and (tmp / "kd" / "loss.png").exists()
    assert (tmp / "kd" / "checkpoint" / "tokenizer.model").exists()      # the checkpoint is self-contained


def test_ul2_and_finetune_and_generate(pipeline, capsys):
    tmp, text = pipeline
    assert cli.main(["train", "--model", str(tmp / "t5"), "--objective", "ul2", "--out", str(tmp / "ul2"),
                     "--data", str(text), *COMMON[:1], "8", *COMMON[2:]]) == 0
    task = tmp / "cls.jsonl"
    task.write_text("\n".join(json.dumps({"text": f"{w} is here", "label": int(i % 2)})
                              for i, w in enumerate(["king", "fool"] * 20)))
    assert cli.main(["finetune", "--model", str(tmp / "kd" / "checkpoint"), "--task", str(task), "--kind",
                     "classify", "--out", str(tmp / "cls"), *COMMON[:1], "20", *COMMON[2:]]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tmp / "kd" / "checkpoint"), "--prompt", "The king",
                     "--max-new-tokens", "5"]) == 0


def test_bad_input_fails_before_training(pipeline, tmp_path, capsys):
    tmp, text = pipeline
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert cli.main(["pretrain", "--out", str(tmp_path / "a"), "--data", str(empty), *COMMON]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    short = tmp_path / "short.txt"
    short.write_text("a b c")
    assert cli.main(["pretrain", "--out", str(tmp_path / "b"), "--data", str(short), "--tokenizer",
                     str(tmp / "pre" / "tokenizer.model"), *COMMON[:4], "--seq-len", "4096", "--warmup", "5"]) == 2
    assert "fewer than one row" in capsys.readouterr().err
    from minencdec.io.tokenizer import train_tokenizer
    # A model directory without its own tokenizer.model: --tokenizer is then the tokenizer (a
    # directory that has one refuses any other, tests/cli/test_reliability_cli.py).
    bare = tmp_path / "t5-bare"
    shutil.copytree(tmp / "t5", bare, ignore=shutil.ignore_patterns("tokenizer.model"))
    train_tokenizer([text.read_text()], 400, num_sentinels=0).save(tmp_path / "nosent")
    assert cli.main(["train", "--model", str(bare), "--objective", "ul2", "--out", str(tmp_path / "c"),
                     "--data", str(text), "--tokenizer", str(tmp_path / "nosent"), *COMMON]) == 2
    assert "sentinel" in capsys.readouterr().err
    train_tokenizer([text.read_text()], 800, num_sentinels=100).save(tmp_path / "big")
    assert cli.main(["train", "--model", str(bare), "--objective", "prefixlm", "--out", str(tmp_path / "d"),
                     "--data", str(text), "--tokenizer", str(tmp_path / "big"), *COMMON]) == 2
    assert "vocab" in capsys.readouterr().err.lower()
    for run in "abcd":
        assert not (tmp_path / run / "checkpoint").exists()
