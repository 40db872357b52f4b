"""`--help` documents every flag with its default; `--version` says which sam-pipeline this is."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_that_shows_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "secret-token-must-not-show")
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a default such as sam-pipeline/
    parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "secret-token-must-not-show" not in text
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings} has no help text"
        if action.default not in (None, False, "", argparse.SUPPRESS):
            assert f"(default: {action.default})" in text, (command, action.option_strings)


def test_version():
    from importlib import metadata

    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == f"sam-pipeline {metadata.version('sam-pipeline')}"
