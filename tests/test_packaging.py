"""The README's Quickstart and CI agree, and the console script is wired up."""

import importlib
import json
import pathlib
import re
import sys

import defuse_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_exactly_two_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands)
    assert "defuse-jax run" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = _quickstart_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_console_script_runs_the_cli(monkeypatch, capsys):
    """The script pyproject.toml declares resolves, and runs a command the way the installed
    wrapper calls it: no arguments (the command line comes from sys.argv), exit code returned."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    (target,) = re.findall(r'^defuse-jax = "([\w.]+):(\w+)"$', scripts, flags=re.M)
    main = getattr(importlib.import_module(target[0]), target[1])
    monkeypatch.setattr(sys, "argv", ["defuse-jax", "info", "--json"])
    assert main() == 0
    assert json.loads(capsys.readouterr().out)["defuse_jax"] == defuse_jax.__version__
