"""The `dalipipe` command: every registered sub-command exists and answers --help."""

import importlib
import subprocess
import sys

import pytest

from dalipipe.cli import COMMANDS, FOR_PEOPLE, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_module_has_a_main(name):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.main)


def test_help_lists_the_commands_for_people_first_then_every_stage(capsys):
    assert main(["--help"]) == 0
    _, people, stages = capsys.readouterr().out.rstrip("\n").split("\n\n")
    assert people.splitlines()[0] == "commands:"
    assert [line.split()[0] for line in people.splitlines()[1:]] == list(FOR_PEOPLE)
    assert stages.splitlines()[0].startswith("workflow stages")
    listed = [line.split()[0] for line in stages.splitlines()[1:]]
    assert listed == [name for name in COMMANDS if name not in FOR_PEOPLE]
    assert set(FOR_PEOPLE) <= set(COMMANDS)


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
