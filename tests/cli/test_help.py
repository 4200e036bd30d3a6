"""Every command's ``--help`` prints (argparse %-formats help strings: a stray ``%`` crashed it) and lists every option."""

import dataclasses

import pytest

from hf_influence.cli.main import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_lists_every_option_of_the_command(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    dataclass_types, _ = COMMANDS[name].load()
    missing = [f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f"--{f.name}" not in text]
    assert not missing, f"hf-influence {name} --help does not list {missing}"
