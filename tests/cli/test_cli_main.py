"""The `mistral7b` entry point: console script, help, dispatch."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from cli_helpers import cli_env

from mistral7b.cli.main import COMMANDS, main


def test_console_script_is_installed():
    exe = shutil.which("mistral7b")
    assert exe, "the `mistral7b` console script is not on PATH (pip install -e .)"
    result = subprocess.run([exe, "--help"], check=False, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, env=cli_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mistral7b {command}")


def test_generate_help_says_greedy_by_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "greedy" in capsys.readouterr().out
