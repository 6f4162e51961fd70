"""The commands under bad input and abuse: one run per directory, nothing overwritten that is
not theirs, settings that cannot drift on --resume, one-line errors instead of tracebacks.

Oracles are facts outside the code under test: a process that really holds the flock, bytes
on disk before and after, the exit status the shell sees, the vocabulary and position limits
written in config.json. Each refusal has a negative control that gets past the same check.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from minencdec import cli
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.io.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--save-every", "2",
       "--warmup", "1", "--backend", "numpy"]


def corpus(path, seed=0, lines=300):
    rng = np.random.default_rng(seed)
    who, verbs = ["the king", "a fool", "my lord", "the queen"], ["doth love", "shall see", "hath slain"]
    what = ["the crown.", "his friend.", "the night."]
    path.write_text("\n".join(f"{who[rng.integers(4)].capitalize()} {verbs[rng.integers(3)]} "
                              f"{what[rng.integers(3)]}" for _ in range(lines)))
    return path


def run(capsys, *argv):
    """(exit code, stderr) of `minencdec argv`, argparse's own exits included."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(err, command):
    """The last line is `minencdec COMMAND: error: ...` and nothing looks like a traceback."""
    assert "Traceback" not in err, err
    assert err.strip(), "no error was printed"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"minencdec {command}: error: "), err
    return last


def task_file(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def labelled(n, label=lambda i: i % 2):
    return [{"text": f"{['king', 'fool'][i % 2]} number {i}", "label": label(i)} for i in range(n)]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A pretrained nano Gemma 2, its adaptation, a classifier fine-tuned from that, and copies
    of the first two whose config.json allows only 8 positions."""
    tmp = tmp_path_factory.mktemp("made")
    text = corpus(tmp / "corpus.txt")
    assert cli.main(["pretrain", "--out", str(tmp / "pre"), "--data", str(text), "--preset", "nano",
                     "--vocab-size", "400", *RUN]) == 0
    adapt_checkpoints(tmp / "pre" / "checkpoint", tmp / "pre" / "checkpoint", tmp / "t5")
    assert cli.main(["finetune", "--model", str(tmp / "t5"), "--task", str(task_file(tmp / "cls.jsonl", labelled(24))),
                     "--kind", "classify", "--out", str(tmp / "cls"), *RUN]) == 0
    for name, source in (("short-pre", tmp / "pre" / "checkpoint"), ("short-t5", tmp / "t5")):
        shutil.copytree(source, tmp / name)
        config = json.loads((tmp / name / "config.json").read_text())
        for c in (config, config.get("encoder"), config.get("decoder")):
            if c and "max_position_embeddings" in c:
                c["max_position_embeddings"] = 8
        (tmp / name / "config.json").write_text(json.dumps(config))
    return tmp


# ---------------------------------------------------------------------------- A. data loss

@pytest.fixture
def lock_holder():
    """Another process that holds the flock of RUN/.lock (and wrote its pid), until released."""
    procs = []

    def hold(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
                "print('locked', flush=True); sys.stdin.read()")
        p = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p
    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=10)


@pytest.mark.parametrize("command", ["pretrain", "train", "finetune", "demo"])
def test_a_run_directory_in_use_is_refused_at_once(made, tmp_path, capsys, lock_holder, command):
    out = tmp_path / "run"
    holder = lock_holder(out)
    argv = {"pretrain": ["--data", made / "corpus.txt", "--preset", "nano", "--vocab-size", "400", *RUN],
            "train": ["--model", made / "t5", "--objective", "prefixlm", "--data", made / "corpus.txt", *RUN],
            "finetune": ["--model", made / "t5", "--task", made / "cls.jsonl", "--kind", "classify", *RUN],
            "demo": ["--data", made / "corpus.txt", "--pretrain-steps", "2", "--train-steps", "2",
                     "--batch-size", "2", "--seq-len", "16", "--backend", "numpy"]}[command]
    code, err = run(capsys, command, "--out", out, *argv)
    line = one_line_error(err, command)
    assert code == 2 and str(out) in line and f"pid {holder.pid}" in line
    assert sorted(os.listdir(out)) == [".lock"]                       # nothing written
    if command == "pretrain":                                          # negative control: once the
        holder.stdin.close()                                           # holder is gone, the stale
        holder.wait(timeout=10)                                        # .lock file blocks nothing
        assert run(capsys, command, "--out", out, *argv)[0] == 0


SIGTERM_SCRIPT = """
import os, signal, sys
from minencdec import cli
from minencdec.training import tasks
real, calls = tasks.CausalLMTask.loss_and_grads, []
def loss_and_grads(self, model, ids):            # `kill` arrives while step 3 is computed
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, model, ids)
tasks.CausalLMTask.loss_and_grads = loss_and_grads
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_saves_the_completed_step_and_exits_143(made, tmp_path):
    out = tmp_path / "run"
    argv = ["pretrain", "--out", out, "--data", made / "corpus.txt", "--preset", "nano", "--vocab-size", "400",
            *RUN[:1], "10", *RUN[2:8], "--save-every", "100", *RUN[10:]]
    r = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, *map(str, argv)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 143, r.stderr
    assert "terminated" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3


def test_dump_never_overwrites_what_is_not_a_dump(made, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(made / "pre" / "checkpoint", ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    dump = ["dump", "--model", ckpt, "--input-ids", "2 5 6"]
    for target, problem in ((ckpt / "model.safetensors", "is not a minencdec activation dump"),
                            (ckpt / "config.json", "is not a minencdec activation dump"),
                            (tmp_path / "missing" / "x.safetensors", "does not exist"),
                            (tmp_path, "is a directory")):
        code, err = run(capsys, *dump, "--out", target)
        assert code == 2 and problem in one_line_error(err, "dump"), err
    assert (ckpt / "model.safetensors").read_bytes() == weights
    assert load_pretrained(ckpt).config.vocab_size == 400
    assert run(capsys, *dump, "--out", tmp_path / "ours.safetensors")[0] == 0       # negative control:
    assert run(capsys, *dump, "--out", tmp_path / "ours.safetensors")[0] == 0       # a dump is replaced
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_a_run_whose_weights_overflow_saves_nothing_and_says_so(made, tmp_path, capsys):
    base = ["pretrain", "--data", made / "corpus.txt", "--preset", "nano", "--vocab-size", "400", *RUN[:-2],
            "--dtype", "float32", "--backend", "numpy"]
    code, err = run(capsys, *base, "--out", tmp_path / "a", "--lr", "1e39", "--steps", "1", "--warmup", "0",
                    "--save-every", "1")
    assert code == 1 and "No checkpoint was saved" in one_line_error(err, "pretrain")
    assert not (tmp_path / "a" / "checkpoint").exists()
    code, err = run(capsys, *base, "--out", tmp_path / "b", "--lr", "inf", "--steps", "1", "--warmup", "0")
    assert code == 2 and "argument --lr: must be a finite number" in one_line_error(err, "pretrain")
    # lr 1e30 keeps step 1 finite (and saved); step 2 then overflows in the forward pass.
    code, err = run(capsys, *base, "--out", tmp_path / "c", "--lr", "1e30", "--steps", "3", "--warmup", "0",
                    "--save-every", "1")
    assert code == 1 and "(step 1)" in one_line_error(err, "pretrain")
    saved = load_pretrained(tmp_path / "c" / "checkpoint")
    assert all(np.isfinite(p).all() for p in saved.params.values())


# ---------------------------------------------------------------------------- B. silent wrong results

def test_resume_with_any_other_setting_is_refused(made, tmp_path, capsys):
    text = corpus(tmp_path / "corpus.txt")
    argv = ["pretrain", "--out", tmp_path / "run", "--data", text, "--preset", "nano", "--vocab-size", "400", *RUN]
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *argv, "--resume")[0] == 0                        # the same settings: resumes
    for change, named in ((["--batch-size", "8"], "batch_size 4 -> 8"), (["--seed", "1"], "seed 0 -> 1"),
                          (["--seq-len", "12"], "seq_len 16 -> 12"), (["--dtype", "float64"], "dtype"),
                          (["--lr", "1e-2"], "lr 0.003 -> 0.01")):
        code, err = run(capsys, *argv, "--resume", *change)
        assert code == 2 and named in one_line_error(err, "pretrain"), (change, err)
    corpus(text, seed=1)                                                 # the same file, other text
    code, err = run(capsys, *argv, "--resume")
    assert code == 2 and "data_sha256" in one_line_error(err, "pretrain")
    corpus(text)
    train_tokenizer([text.read_text() + " zebra quagga"], 400).save(tmp_path / "other")
    code, err = run(capsys, *argv, "--resume", "--tokenizer", tmp_path / "other")
    assert code == 2 and "the tokenizer the run was trained with" in one_line_error(err, "pretrain")
    (tmp_path / "run" / "checkpoint" / "optimizer.safetensors").write_bytes(b"garbage!")
    code, err = run(capsys, *argv, "--resume")
    assert code == 2 and "optimizer.safetensors: damaged" in one_line_error(err, "pretrain")


def test_train_resume_compares_objective_and_distillation(made, tmp_path, capsys):
    argv = ["train", "--model", made / "t5", "--objective", "prefixlm-kd", "--out", tmp_path / "kd",
            "--data", made / "corpus.txt", *RUN]
    assert run(capsys, *argv)[0] == 0
    for change, named in ((["--alpha", "0.5"], "alpha 1.0 -> 0.5"), (["--temperature", "2"], "temperature 1.0 -> 2.0"),
                          (["--teacher", made / "t5-teacher"], "teacher_sha256")):
        if "--teacher" in change and not (made / "t5-teacher").exists():
            other = load_pretrained(made / "pre" / "checkpoint")
            other.params["model.norm.weight"] += 1.0
            other.save_pretrained(made / "t5-teacher")
        code, err = run(capsys, *argv, "--resume", *change)
        assert code == 2 and named in one_line_error(err, "train"), (change, err)
    code, err = run(capsys, *[a if a != "prefixlm-kd" else "prefixlm" for a in argv], "--resume")
    assert code == 2 and "objective prefixlm-kd -> prefixlm" in one_line_error(err, "train")


def test_a_tokenizer_other_than_the_models_is_refused(made, tmp_path, capsys):
    train_tokenizer([corpus(tmp_path / "other.txt", seed=5, lines=50).read_text() + " zebra quagga"], 400,
                    seed=1).save(tmp_path / "other")
    for command, extra in (("train", ["--objective", "prefixlm", "--data", made / "corpus.txt"]),
                           ("finetune", ["--task", made / "cls.jsonl", "--kind", "classify"])):
        code, err = run(capsys, command, "--model", made / "t5", "--out", tmp_path / command, "--tokenizer",
                        tmp_path / "other", *extra, *RUN)
        line = one_line_error(err, command)
        assert code == 2 and str(tmp_path / "other" / "tokenizer.model") in line
        assert str(made / "t5" / "tokenizer.model") in line
        assert not (tmp_path / command / "checkpoint").exists()
    # Negative control: the model's own tokenizer, given explicitly, is accepted.
    assert run(capsys, "train", "--model", made / "t5", "--out", tmp_path / "same", "--tokenizer", made / "t5",
               "--objective", "prefixlm", "--data", made / "corpus.txt", *RUN)[0] == 0


def test_sequences_longer_than_the_model_allows_are_refused(made, tmp_path, capsys):
    code, err = run(capsys, "train", "--model", made / "short-t5", "--objective", "prefixlm", "--out",
                    tmp_path / "a", "--data", made / "corpus.txt", *RUN)            # --seq-len 16 > 8
    assert code == 2 and "max_position_embeddings (8)" in one_line_error(err, "train")
    code, err = run(capsys, "pretrain", "--out", tmp_path / "b", "--data", made / "corpus.txt", "--preset", "nano",
                    "--vocab-size", "400", *RUN[:4], "--seq-len", "8193", *RUN[6:])
    assert code == 2 and "max_position_embeddings (8192)" in one_line_error(err, "pretrain")
    assert not (tmp_path / "a" / "checkpoint").exists() and not (tmp_path / "b" / "checkpoint").exists()
    # Negative control: 8 positions are enough for --seq-len 8.
    assert run(capsys, "train", "--model", made / "short-t5", "--objective", "prefixlm", "--out", tmp_path / "c",
               "--data", made / "corpus.txt", *RUN[:4], "--seq-len", "8", *RUN[6:])[0] == 0


def test_classification_needs_two_classes_and_labels_the_model_has(made, tmp_path, capsys):
    def finetune(model, rows, out):
        return run(capsys, "finetune", "--model", model, "--task", task_file(tmp_path / f"{out}.jsonl", rows),
                   "--kind", "classify", "--out", tmp_path / out, *RUN)
    code, err = finetune(made / "t5", labelled(24, lambda i: 1), "one")
    assert code == 2 and "every training example has label 1" in one_line_error(err, "finetune")
    code, err = finetune(made / "cls" / "checkpoint", labelled(24, lambda i: [0, 1, 5][i % 3]), "five")
    assert code == 2 and "label 5 is outside the classifier's 2 classes" in one_line_error(err, "finetune")
    code, err = finetune(made / "t5", labelled(24, lambda i: i % 2 - 1), "negative")
    assert code == 2 and "label -1 is negative" in one_line_error(err, "finetune")
    assert not any((tmp_path / out / "checkpoint").exists() for out in ("one", "five", "negative"))
    assert finetune(made / "cls" / "checkpoint", labelled(24), "again")[0] == 0      # negative control


def test_a_classifier_is_not_a_language_model(made, tmp_path, capsys):
    code, err = run(capsys, "train", "--model", made / "cls" / "checkpoint", "--objective", "prefixlm",
                    "--out", tmp_path / "x", "--data", made / "corpus.txt", *RUN)
    assert code == 2 and "is a classifier checkpoint (T5GemmaForSequenceClassification)" in \
        one_line_error(err, "train")
    code, err = run(capsys, "generate", "--model", made / "cls" / "checkpoint", "--prompt-ids", "2 5")
    assert code == 2 and "classifier" in one_line_error(err, "generate")


# ---------------------------------------------------------------------------- C. one-line errors

@pytest.mark.parametrize("change, message", [
    (["--eval-every", "0"], "argument --eval-every: must be a positive integer, got 0"),
    (["--save-every", "0"], "argument --save-every: must be a positive integer, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--steps", "10", "--warmup", "50"], "--warmup 50 must be smaller than --steps 10"),
    (["--batch-size", "500"], "--batch-size 500 is larger than the"),
])
def test_bad_training_options_are_one_line_errors(made, tmp_path, capsys, change, message):
    code, err = run(capsys, "pretrain", "--out", tmp_path / "run", "--data", made / "corpus.txt", "--preset",
                    "nano", "--vocab-size", "400", *RUN, *change)
    assert code == 2 and message in one_line_error(err, "pretrain"), err
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("line, message", [
    ('{"text": "a king", "label": 0', "line 2: not valid JSON"),
    ('{"text": 5, "label": 0}', "line 2: field 'text' must be text, got 5"),
    ("5", "line 2: expected an object"),
    ('["a king", 0]', "line 2: expected an object"),
    ('{"text": "a king", "label": true}', "line 2: field 'label' must be an integer class id, got true"),
    ('{"text": "a king"}', "line 2: field 'label' must be an integer class id, got nothing"),
])
def test_malformed_task_lines_name_file_and_line(made, tmp_path, capsys, line, message):
    rows = [json.dumps(r) for r in labelled(8)]
    task = task_file(tmp_path / "task.jsonl", rows[:1] + [line] + rows[1:])
    code, err = run(capsys, "finetune", "--model", made / "t5", "--task", task, "--kind", "classify",
                    "--out", tmp_path / "run", *RUN)
    assert code == 2 and f"{task}, {message}" in one_line_error(err, "finetune"), err


def test_generate_checks_ids_and_room_before_generating(made, capsys):
    code, err = run(capsys, "generate", "--model", made / "pre" / "checkpoint", "--prompt-ids", "2 99999999999999999999")
    assert code == 2 and "id 99999999999999999999 is outside the vocabulary [0, 400)" in one_line_error(err, "generate")
    code, err = run(capsys, "generate", "--model", made / "pre" / "checkpoint", "--prompt-ids", "2 x 5")
    assert code == 2 and "'x' is not an integer token id" in one_line_error(err, "generate")
    short = ["generate", "--model", made / "short-pre", "--prompt-ids", "2 5 6", "--greedy"]
    code, err = run(capsys, *short, "--max-new-tokens", "6")                  # 3 + 6 > 8 positions
    assert code == 2 and "at most 5" in one_line_error(err, "generate")
    code, err = run(capsys, *short, "--max-new-tokens", "1000000000")
    assert code == 2 and "at most 5" in one_line_error(err, "generate")
    assert run(capsys, *short, "--max-new-tokens", "5")[0] == 0                # negative control


# ---------------------------------------------------------------------------- D. hangs

def test_a_fifo_as_data_is_refused_without_waiting(made, tmp_path, capsys):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)

    def unblock():                     # only an old reader still waits: let it see an empty pipe
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)
    guard = threading.Timer(10.0, unblock)
    guard.daemon = True
    guard.start()
    try:
        code, err = run(capsys, "pretrain", "--out", tmp_path / "run", "--data", fifo, *RUN)
    finally:
        guard.cancel()
    assert code == 2 and f"{fifo} is a FIFO (named pipe), not a regular file" in one_line_error(err, "pretrain")


def test_a_device_as_data_is_refused(tmp_path):
    """/dev/zero never ends: run in a child limited to 3 GiB of address space, so that a
    version that reads it fails there instead of filling this machine's memory."""
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from minencdec import cli; sys.exit(cli.main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "pretrain", "--out", str(tmp_path / "run"), "--data", "/dev/zero",
                        "--backend", "numpy"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "/dev/zero is a device, not a regular file" in r.stderr, r.stderr


def test_a_corpus_above_the_limit_is_refused_with_its_size(tmp_path, capsys, monkeypatch):
    from minencdec.training import data
    monkeypatch.setattr(data, "MAX_CORPUS_BYTES", 1000)
    big = tmp_path / "big.txt"
    big.write_text("x" * 1500)
    code, err = run(capsys, "pretrain", "--out", tmp_path / "a", "--data", big, *RUN)
    assert code == 2 and "1,500 bytes of text, more than the 1,000 bytes" in one_line_error(err, "pretrain")
    (tmp_path / "folder").mkdir()
    for i in range(3):
        (tmp_path / "folder" / f"{i}.txt").write_text("y" * 400)
    code, err = run(capsys, "pretrain", "--out", tmp_path / "b", "--data", tmp_path / "folder", *RUN)
    assert code == 2 and "1,200 bytes of text" in one_line_error(err, "pretrain")
    assert data.load_texts(tmp_path / "folder" / "0.txt") == ["y" * 400]          # negative control


# ---------------------------------------------------------------------------- adapt --overwrite

def test_adapt_replaces_an_existing_output_only_with_overwrite(made, tmp_path, capsys):
    argv = ["adapt", "--encoder-from", made / "pre" / "checkpoint", "--decoder-from", made / "pre" / "checkpoint",
            "--out", tmp_path / "t5"]
    assert run(capsys, *argv)[0] == 0
    before = (tmp_path / "t5" / "model.safetensors").read_bytes()
    code, err = run(capsys, *argv, "--seed", "1", "--cross-attn", "random")
    assert code == 2 and str(tmp_path / "t5") in one_line_error(err, "adapt")
    assert (tmp_path / "t5" / "model.safetensors").read_bytes() == before
    assert run(capsys, *argv, "--seed", "1", "--cross-attn", "random", "--overwrite")[0] == 0
    assert (tmp_path / "t5" / "model.safetensors").read_bytes() != before
