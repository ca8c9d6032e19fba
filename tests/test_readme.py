"""The README's command and configuration reference stays true to the click commands."""

from __future__ import annotations

from pathlib import Path

import click

from pgqueue.cli import main, reaper_command, worker_command

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name, command in group.commands.items():
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found += _commands(command, path)
        else:
            found.append((path, command))
    return found


def _options(command: click.Command) -> list[str]:
    names = []
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            names += [o for o in param.opts if o.startswith("--") and o not in ("--help",)]
    return names


def test_every_command_is_documented():
    for path, _ in _commands(main, "pgqueue"):
        if path in ("pgqueue worker", "pgqueue reaper"):
            continue  # documented as pgqueue-worker / pgqueue-reaper
        assert f"`{path}" in README, path


def test_every_flag_and_environment_variable_is_documented():
    commands = [("pgqueue-worker", worker_command), ("pgqueue-reaper", reaper_command)]
    commands += _commands(main, "pgqueue")
    for path, command in commands:
        for option in _options(command):
            assert option in README, f"{path} {option}"
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            for name in [envvar] if isinstance(envvar, str) else envvar or []:
                assert name in README, f"{path} {name}"
