"""The `fastnl` command: every subcommand has --help, errors are one line."""
import subprocess
import sys

import pytest

from fastnl import cli
from fastnl.errors import UserError


def test_python_m_fastnl_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "fastnl", "--help"], capture_output=True, text=True, check=True)
    for module_name in cli.COMMANDS:
        assert module_name.rsplit(".", 1)[1] in out.stdout


@pytest.mark.parametrize("module_name", cli.COMMANDS)
def test_every_subcommand_has_help(module_name, capsys):
    name = module_name.rsplit(".", 1)[1]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastnl " + name in capsys.readouterr().out


def test_user_errors_are_one_line(monkeypatch, capsys):
    def fail(args):
        raise UserError("dataset folder /nowhere not found")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(_run=fail)
    first = cli.COMMANDS[0].rsplit(".", 1)[1]
    assert cli.main([first]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"fastnl {first}: error: dataset folder /nowhere not found"
    with pytest.raises(UserError):
        cli.main([first, "--debug"])
