"""Every tutorial runs to the end in quick mode, as a script and as a notebook, and writes the
figures it promises; every tutorial ends with graded exercises.

A tutorial asserts what it claims, so "runs to the end" means "its claims hold". Each runs as
a student would run it: `python tutorials/NN_name.py` from the repository root, and as the
notebook jupytext makes of it, executed cell by cell in a Jupyter kernel (nbclient). Both use
MINENCDEC_QUICK=1 (small sizes) and send the figures to a temporary directory. CI runs the
suite with torch and without; here the tutorials that use torch also run with it hidden.
New tutorials matching `NN_*.py` are picked up.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))
IDS = [p.stem[:2] for p in TUTORIALS]
TIMEOUT = 300          # seconds per tutorial; the slowest takes ~25 s on 2 shared cores in quick mode
FIGURE = re.compile(r'"(\d\d_\w+\.png)"')
NO_TORCH = """\
import sys
class _Hidden:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/test_tutorials.py)")
sys.meta_path.insert(0, _Hidden())
"""


def environment(figures, extra_path=()):
    # One BLAS thread: tiny matmuls on a shared 2-core machine ran ~20x slower with two.
    path = [*map(str, extra_path), str(ROOT), os.environ.get("PYTHONPATH")]
    return {**os.environ, "MINENCDEC_QUICK": "1", "MINENCDEC_FIGURES": str(figures), "MPLBACKEND": "Agg",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, path))}


def run_script(path, figures, extra_path=()):
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, env=environment(figures, extra_path),
                          capture_output=True, text=True, timeout=TIMEOUT)


def run_notebook(path, figures):
    """Execute the notebook jupytext makes of `path` in a fresh kernel started in tutorials/
    (where Jupyter starts it for a notebook there); raises on the first failing cell.
    figures None: as a student runs it, without MINENCDEC_FIGURES."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    env = environment(figures)
    if figures is None:
        del env["MINENCDEC_FIGURES"]
    client.execute(env=env)
    return notebook


def promised_figures(path):
    names = FIGURE.findall(path.read_text())
    assert names, f"{path.name} saves no figure named \"NN_name.png\""
    assert all(name.startswith(path.name[:3]) for name in names), names
    return names


def assert_figures(path, figures):
    for name in promised_figures(path):
        png = figures / name
        assert png.is_file(), f"{path.name} did not write {name}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"


def test_there_are_tutorials():
    assert len(TUTORIALS) >= 12, TUTORIALS
    assert [p.name[:2] for p in TUTORIALS] == [f"{i:02d}" for i in range(len(TUTORIALS))], "numbered 00, 01, ..."


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_runs_as_a_script(path, tmp_path):
    result = run_script(path, tmp_path)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert_figures(path, tmp_path)


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_runs_as_a_notebook(path, tmp_path):
    run_notebook(path, tmp_path)
    assert_figures(path, tmp_path)


USES_TORCH = [p for p in TUTORIALS if re.search(r"^\s*import torch", p.read_text(), re.M)]


@pytest.mark.parametrize("path", USES_TORCH, ids=[p.stem[:2] for p in USES_TORCH])
def test_tutorial_runs_without_torch(path, tmp_path):
    """CI's bare environment has no torch: the tutorials that use it must take their other path."""
    pytest.importorskip("torch", reason="torch is absent: the script run above already ran without it")
    hide = tmp_path / "hide_torch"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_TORCH)
    result = run_script(path, tmp_path, extra_path=[hide])
    assert result.returncode == 0, f"{path.name} failed without torch:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def test_hiding_torch_works(tmp_path):
    """Negative control for the test above: with the hook, `import torch` fails."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_TORCH)
    probe = tmp_path / "00_probe.py"
    probe.write_text("import torch\n")
    result = run_script(probe, tmp_path, extra_path=[hide])
    assert result.returncode != 0 and "hidden by tests/test_tutorials.py" in result.stderr


def test_a_failing_claim_fails_the_run(tmp_path):
    """Negative control: both runners report a tutorial whose assertion fails."""
    broken = tmp_path / "99_broken.py"
    broken.write_text("# %%\nimport minencdec\n\n# %%\nassert 1 + 1 == 3, 'a false claim'\n")
    result = run_script(broken, tmp_path)
    assert result.returncode != 0 and "a false claim" in result.stderr
    nbclient = pytest.importorskip("nbclient")
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="a false claim"):
        run_notebook(broken, tmp_path)


# ----------------------------------------------------------------------------- exercises

def exercise_problems(path):
    """What is missing from a tutorial's exercises: an "Exercises" section, graded
    exercises, a hidden solution cell before each grading cell."""
    jupytext = pytest.importorskip("jupytext")
    cells = jupytext.read(path).cells
    problems = []
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Exercises" in c.source), None)
    if start is None:
        return ["no '## Exercises' section"]
    graded = [i for i, c in enumerate(cells) if i > start and c.cell_type == "code" and "grade(" in c.source]
    if len(graded) < 2:
        problems.append(f"{len(graded)} graded exercise(s), expected at least 2")
    for i in graded:
        before = cells[start:i][::-1]
        solution = next((c for c in before if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])), None)
        if solution is None or not solution.metadata.get("jupyter", {}).get("source_hidden"):
            problems.append(f"the grading cell {cells[i].source.splitlines()[0]!r} has no hidden solution cell before it")
    return problems


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_ends_with_graded_exercises(path):
    assert exercise_problems(path) == []


def test_exercise_check_finds_a_visible_solution(tmp_path):
    """Negative control: a solution cell that is not hidden, and a tutorial without exercises."""
    visible = tmp_path / "98_visible.py"
    visible.write_text('# %% [markdown]\n# ## Exercises\n\n# %% tags=["solution"]\nx = 1\n\n'
                       '# %%\ngrade("1", f, None, x, 2)\n\n# %%\ngrade("2", f, None, x, 2)\n')
    assert any("no hidden solution" in p for p in exercise_problems(visible))
    none = tmp_path / "97_none.py"
    none.write_text("# %%\nx = 1\n")
    assert exercise_problems(none) == ["no '## Exercises' section"]


# ----------------------------------------------------------------------------- the repository

def git_ignores(relative):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "check-ignore", "-q", "--no-index", relative], cwd=ROOT).returncode == 0


def test_figures_and_notebooks_stay_out_of_git():
    """Running a tutorial leaves nothing git would pick up: the default figure folder and the
    generated .ipynb files are ignored; the committed figures are not."""
    assert git_ignores("tutorials/_output/01_rope.png")
    assert git_ignores("tutorials/01_gemma2_pieces.ipynb")
    assert not git_ignores("tutorials/figures/01_rope.png")       # negative control
    assert not git_ignores("tutorials/01_gemma2_pieces.py")


def test_a_notebook_run_leaves_the_committed_figures_alone():
    """Executing a notebook without MINENCDEC_FIGURES (as a student does) writes its figures
    to the git-ignored folder, not over the committed ones."""
    path = ROOT / "tutorials" / "01_gemma2_pieces.py"
    committed = ROOT / "tutorials" / "figures" / "01_rope.png"
    before = committed.stat().st_mtime_ns
    run_notebook(path, None)
    assert committed.stat().st_mtime_ns == before, "the notebook overwrote the committed figure"
    assert (ROOT / "tutorials" / "_output" / "01_rope.png").is_file()


def test_tutorials_write_figures_only_through_plots():
    """Every figure goes through plots.save, so none lands in the committed folder by default."""
    for path in TUTORIALS:
        text = path.read_text()
        assert "savefig(" not in text and '"figures"' not in text, f"{path.name} writes figures itself"


def test_the_index_and_the_map_name_every_tutorial():
    index = (ROOT / "tutorials" / "README.md").read_text()
    overview = TUTORIALS[0].read_text()
    for path in TUTORIALS:
        assert f"({path.name})" in index, f"tutorials/README.md does not link {path.name}"
        assert f"| {int(path.name[:2])} " in overview, f"{TUTORIALS[0].name}'s map has no row for {path.name}"


@pytest.mark.parametrize("path", TUTORIALS, ids=IDS)
def test_tutorial_stays_one_sitting(path):
    """A tutorial a student reads in one sitting: at most 600 lines, exercises included
    (tutorial 8 once had 799 lines and six topics). A longer lesson splits in two, as 8 and 9 did."""
    assert len(path.read_text().splitlines()) <= 600, f"{path.name} has grown past 600 lines: split it"
