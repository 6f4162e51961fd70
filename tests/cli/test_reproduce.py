"""`minencdec reproduce`'s command line: bad options are refused before anything runs, and
the command a run records is the one that makes it again. (The harness itself:
tests/experiments/test_ablations.py.)"""

import argparse

import pytest

from minencdec.cli import reproduce


def parser():
    p = argparse.ArgumentParser(prog="minencdec")
    reproduce.add_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_repeated_seeds_are_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce.ablations, "run", lambda *a, **k: pytest.fail("the run started"))
    args = parser().parse_args(["reproduce", "--out", str(tmp_path / "r"), "--seeds", "0", "0"])
    with pytest.raises(ValueError, match="--seeds must be different seeds, got 0 0"):
        args.func(args)
    assert not (tmp_path / "r").exists()


def test_a_negative_seed_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["reproduce", "--seeds", "-1"])
    assert "argument --seeds: must be an integer >= 0, got -1" in capsys.readouterr().err


def test_the_recorded_command_is_the_one_typed():
    args = parser().parse_args(["reproduce", "--quick", "--seeds", "3", "4", "--backend", "numpy"])
    assert reproduce._command(args) == "minencdec reproduce --out runs/reproduce --quick --seeds 3 4 --backend numpy"
    assert reproduce._command(parser().parse_args(["reproduce"])) == "minencdec reproduce --out runs/reproduce"
