"""export-torch and import-torch under bad input: a one-line error that names the problem, and
nothing written. Oracles are facts outside the code under test: the bytes on disk before and
after, the exit status, the settings trainer_state.json recorded. The successful hand-overs of
test_handover.py are the negative controls: the same commands on good input get past each check.
The refusals of export-torch need no torch (they come before it is imported); those of
import-torch need a handover directory, which only an export (torch) writes.
"""

import json
import shutil
import sys

import numpy as np
import pytest
from test_handover import N, corpus, made, minencdec, needs_torch, runs  # noqa: F401 (made: a fixture)

from minencdec.io.pretrained import load_pretrained


def error(capsys, command, *argv):
    """The one-line error of `minencdec command argv` (exit code 2, no traceback)."""
    capsys.readouterr()
    assert minencdec(command, *argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"minencdec {command}: error: "), err
    return last


def snapshot(path):
    """Every file under `path` with its bytes (an absent path is {})."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


@pytest.fixture(scope="module")
def trained(made, tmp_path_factory):
    """A prefixlm and a prefixlm-kd run stopped at step N."""
    tmp = tmp_path_factory.mktemp("refusals")
    return {objective: runs(made, tmp, objective, stops=(N,))[N] for objective in ("prefixlm", "prefixlm-kd")}


def test_export_refuses_a_run_it_cannot_continue_and_writes_nothing(made, trained, tmp_path, capsys):
    out = tmp_path / "out"
    before = snapshot(made / "pre")
    line = error(capsys, "export-torch", made / "pre", "--out", out, "--data", made / "corpus.txt")
    assert "not a `minencdec train` run" in line and "prefixlm, prefixlm-kd, ul2" in line
    line = error(capsys, "export-torch", tmp_path / "nothing", "--out", out)
    assert "nothing: no such run directory" in line and not (tmp_path / "nothing").exists()
    (tmp_path / "empty").mkdir()
    line = error(capsys, "export-torch", tmp_path / "empty", "--out", out)
    assert "holds no checkpoint (checkpoint/trainer_state.json is missing)" in line
    assert snapshot(made / "pre") == before and not out.exists()


def test_export_refuses_other_text_a_used_directory_and_a_stray_teacher(made, trained, tmp_path, capsys):
    run, out = trained["prefixlm"], tmp_path / "out"
    other = corpus(tmp_path / "other.txt", lines=200)
    line = error(capsys, "export-torch", run, "--out", out, "--data", other)
    assert "data_sha256" in line and "the data given is not the run's" in line
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = error(capsys, "export-torch", run, "--out", out, "--data", made / "corpus.txt")
    assert "already exists and is not empty" in line and "replaces nothing" in line
    assert snapshot(out) == {(out / "notes.txt").relative_to(out): b"mine"}
    line = error(capsys, "export-torch", run, "--out", tmp_path / "new", "--data", made / "corpus.txt",
                 "--teacher", made / "pre" / "checkpoint")
    assert "which has no teacher" in line and not (tmp_path / "new").exists()


def test_export_of_distillation_needs_the_runs_own_teacher(made, trained, tmp_path, capsys):
    run, out = trained["prefixlm-kd"], tmp_path / "out"
    state = json.loads((run / "checkpoint" / "trainer_state.json").read_text())
    line = error(capsys, "export-torch", run, "--out", out, "--data", made / "corpus.txt")
    assert "give --teacher DIR" in line and state["settings"]["teacher_sha256"] in line
    other = load_pretrained(made / "pre" / "checkpoint")
    other.params["model.norm.weight"] += 1.0
    other.save_pretrained(tmp_path / "other-teacher")
    line = error(capsys, "export-torch", run, "--out", out, "--data", made / "corpus.txt",
                 "--teacher", tmp_path / "other-teacher")
    assert "teacher_sha256" in line and "the teacher given is not the run's" in line
    assert not out.exists()


def test_export_without_torch_says_what_it_needs(made, trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)                   # `import torch` raises ImportError
    line = error(capsys, "export-torch", trained["prefixlm"], "--out", tmp_path / "out", "--data", made / "corpus.txt")
    assert "needs torch" in line and "import-torch needs neither" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- import-torch

@pytest.fixture(scope="module")
def handover(made, trained, tmp_path_factory):
    needs_torch()
    out = tmp_path_factory.mktemp("handover") / "dir"
    assert minencdec("export-torch", trained["prefixlm"], "--out", out, "--data", made / "corpus.txt") == 0
    return out


def damaged(handover, tmp_path, change):
    """A copy of the handover directory with `change(directory)` applied."""
    copy = tmp_path / "damaged"
    shutil.copytree(handover, copy)
    change(copy)
    return copy


def edit_json(change):
    def edit(directory):
        h = json.loads((directory / "handover.json").read_text())
        change(h)
        (directory / "handover.json").write_text(json.dumps(h))
    return edit


def test_import_into_a_directory_holding_a_run_is_refused(made, trained, handover, capsys):
    run = trained["prefixlm"]
    before = snapshot(run)
    line = error(capsys, "import-torch", handover, "--out", run)
    assert "already holds a run" in line and snapshot(run) == before


def first_moment(directory):
    from safetensors.numpy import load_file
    return load_file(str(directory / "optimizer.safetensors"))


def _with_moments(change):
    def edit(directory):
        from safetensors.numpy import save_file
        tensors = first_moment(directory)
        change(tensors)
        save_file(tensors, str(directory / "optimizer.safetensors"))
    return edit


def _config(change):
    def edit(directory):
        config = json.loads((directory / "config.json").read_text())
        change(config)
        (directory / "config.json").write_text(json.dumps(config))
    return edit


def _nan(tensors):
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan


@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "handover.json").unlink(), "handover.json is missing"),
    (lambda d: (d / "handover.json").write_text("{not json"), "handover.json: damaged, not valid JSON"),
    (edit_json(lambda h: h.update(format="minencdec.handover/0")), "unknown format 'minencdec.handover/0'"),
    (edit_json(lambda h: h["optimizer"]["param_steps"].update({"model.encoder.norm.weight": N + 1})),
     f"are not in 1..{N}"),
    (edit_json(lambda h: h["minencdec"]["settings"].pop("dtype")), "does not record ['dtype']"),
    (edit_json(lambda h: h["minencdec"]["train_config"].pop("lr")), "train_config lacks ['lr']"),
    (edit_json(lambda h: h["optimizer"].update(eps=1e-6)), "optimizer.safetensors: does not fit"),
    (_with_moments(_nan), "holds NaN or infinity"),
    (_with_moments(lambda t: t.update({"exp_avg/model.stray.weight": np.zeros(2, np.float32)})),
     "moments of parameters the run does not train: ['model.stray.weight']"),
    (_with_moments(lambda t: t.update({"momentum/x": np.zeros(2, np.float32)})), "are not named exp_avg/NAME"),
    (_config(lambda c: c["decoder"].update(final_logit_softcapping=20.0)), "the model given is not the run's"),
    (lambda d: (d / "optimizer.safetensors").write_bytes(b"garbage!"), "not a readable safetensors file"),
])
def test_import_refuses_a_damaged_handover_and_writes_nothing(handover, tmp_path, capsys, change, message):
    bad = damaged(handover, tmp_path, change)
    line = error(capsys, "import-torch", bad, "--out", tmp_path / "run")
    assert message in line, line
    assert snapshot(tmp_path / "run") == {}


def test_import_of_the_undamaged_handover_passes_every_check(handover, tmp_path):
    """The negative control of the refusals above: the same directory, unchanged, is imported."""
    assert minencdec("import-torch", damaged(handover, tmp_path, lambda d: None), "--out", tmp_path / "run") == 0
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").is_file()
