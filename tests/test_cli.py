"""The `dalipipe` command: every registered sub-command exists and answers --help."""

import importlib
import subprocess
import sys

import pytest

from dalipipe.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_module_has_a_main(name):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert listed == list(COMMANDS)


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_console_script_reaches_a_sub_command():
    result = subprocess.run(
        [sys.executable, "-m", "dalipipe.cli", "score", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert "--predictions" in result.stdout
