"""``nmsparse --help`` and every command's help: each option says what it does, each command
shows examples, and the option-rich commands group their options."""

import argparse
import re

import pytest

from nmsparse.app.cli.main import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = _commands()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_has_help_text(name):
    missing = [action.option_strings or [action.dest]
               for action in COMMANDS[name]._actions
               if not isinstance(action, argparse._HelpAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, f"nmsparse {name}: no help for {missing}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_shows_examples(name, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([name, "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    examples = text.split("examples:\n", 1)[1].splitlines()
    assert examples and all(line.startswith("  nmsparse ") for line in examples), text


@pytest.mark.parametrize("name", ["train", "eval", "export", "summary", "prune"])
def test_option_rich_commands_group_their_options(name):
    groups = [g.title for g in COMMANDS[name]._action_groups
              if g.title not in ("positional arguments", "options") and g._group_actions]
    assert groups, f"nmsparse {name} has no option groups"


def test_help_lists_no_tombstone():
    assert "bench" not in COMMANDS


def test_models_table_is_aligned(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rule, rows = lines[0], lines[1], lines[2:]
    starts = [m.start() for m in re.finditer(r"(?<=  )\S", rule)]  # where columns begin
    assert len(starts) == 2 and header.index("tasks") == starts[0], header
    for row in rows:
        assert row[starts[0] - 2:starts[0]] == "  " and row[starts[0]] != " ", row
        assert row[starts[1] - 2:starts[1]] == "  " and row[starts[1]] != " ", row


def test_load_trained_has_the_public_name_the_readme_gives():
    import nmsparse.app.train
    from nmsparse.app.train import load_trained
    from nmsparse.app.train.trainer import load_trained as where_it_lives

    assert load_trained is where_it_lives is nmsparse.app.train.load_trained
