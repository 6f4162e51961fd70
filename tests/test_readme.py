"""The README's commands are the ones CI runs, and the documented commands exist."""

import re
from pathlib import Path

import pytest

from minencdec import cli

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "README quickstart needs its two commands"
    test_command = blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], f"{test_command!r} is not run by .ci/run"
    # Negative control: a command that is not in CI is not found.
    assert "pytest --not-the-command" not in [line.strip() for line in ci]


def test_documented_commands_exist(capsys):
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`minencdec (\w+)", readme))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    helptext = capsys.readouterr().out
    for name in documented:
        assert name in helptext, f"README documents `minencdec {name}` but the CLI has no such command"
