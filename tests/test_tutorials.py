"""Every tutorial runs to the end in quick mode and writes the figures it promises.

A tutorial asserts what it claims, so "runs to the end" means "its claims hold". Each runs
as a student would run it (`python tutorials/NN_name.py` from the repository root), with
MINENCDEC_QUICK=1 (small sizes) and its figures sent to a temporary directory so the
committed PNGs are not overwritten. New tutorials matching `NN_*.py` are picked up.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
TIMEOUT = 240          # seconds; each takes well under a minute on 2 cores in quick mode
FIGURE = re.compile(r'FIG / "(\d\d_\w+\.png)"')


def run_tutorial(path, figures):
    # One BLAS thread: tiny matmuls on a shared 2-core machine ran ~20x slower with two.
    env = {**os.environ, "MINENCDEC_QUICK": "1", "MINENCDEC_FIGURES": str(figures), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 4, TUTORIALS


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_and_writes_its_figures(path, tmp_path):
    promised = FIGURE.findall(path.read_text())
    assert promised, f"{path.name} saves no figure as FIG / \"NN_name.png\""
    assert all(name.startswith(path.name[:3]) for name in promised), promised
    result = run_tutorial(path, tmp_path)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for name in promised:
        png = tmp_path / name
        assert png.is_file(), f"{path.name} did not write {name}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def test_a_failing_claim_fails_the_run(tmp_path):
    """Negative control: the runner reports a tutorial whose assertion fails."""
    broken = tmp_path / "99_broken.py"
    broken.write_text("# %%\nimport minencdec\nassert 1 + 1 == 3, 'a false claim'\n")
    result = run_tutorial(broken, tmp_path)
    assert result.returncode != 0 and "a false claim" in result.stderr
