"""The README's two set-up commands stay true: CI runs the test command verbatim."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _commands():
    text = (REPO / "README.md").read_text()
    setup = text.split("## Set up a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", setup, re.S)


def test_exactly_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    assert cmds[0].endswith("dualblade chat")
    assert cmds[1].endswith("pytest")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()
