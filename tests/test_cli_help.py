"""`maestro --help` as a user reads it in a terminal: grouped commands in a useful order, no
type junk (`<bool>` on a flag, `{name}` for an argument), paragraphs that wrap at the
terminal's width instead of breaking where the source did, and examples on the main commands.
The installed entry point, COLUMNS set as a terminal would."""

from __future__ import annotations

import functools
import re

import pytest

from .test_cli import run_maestro

MAIN_COMMANDS = (
    ("backup", "run"), ("backup", "list"), ("backup", "info"), ("restore",), ("drill",),
    ("tenants", "add"), ("tenants", "load"), ("db", "status"),
)
OTHER_COMMANDS = ((), ("backup",), ("backup", "verify"), ("db", "downgrade"), ("restore", "cleanup"),
                  ("backup", "automation"), ("backup", "automation", "status"))
EXAMPLE = "     "
"""Where an example line starts: the help's margin and the example's indent."""


@functools.lru_cache(maxsize=None)  # one process per command and width, whatever the tests ask
def help_of(*command: str, columns: int = 80) -> str:
    result = run_maestro(*command, "--help", env={"COLUMNS": str(columns)})
    assert result.returncode == 0, result.stderr
    return result.stdout


def prose(text: str) -> list[str]:
    """The help's text between the usage line and the first panel, line by line."""
    return [line.rstrip() for line in text.split("╭─", 1)[0].splitlines()[3:]]


def test_main_help_groups_every_command_in_the_order_people_need_them():
    text = help_of()
    assert re.findall(r"^╭─ (.+?) ─", text, flags=re.MULTILINE) == [
        "Options", "Everyday", "Backups & recovery", "Database"], text
    names = re.findall(r"^│ (\w+) ", text, flags=re.MULTILINE)
    assert [n for n in names if n in ("tenants", "demo", "backup", "restore", "drill", "db")] == [
        "tenants", "demo", "backup", "restore", "drill", "db"], names


@pytest.mark.parametrize("command", MAIN_COMMANDS + OTHER_COMMANDS, ids=" ".join)
def test_help_shows_no_type_junk(command):
    text = help_of(*command)
    assert not re.search(r"<(bool|str|int|float|path)>", text), text
    usage = text.splitlines()[1]
    assert "{" not in usage, usage  # a required argument is NAME, not {name}
    if command == ("tenants", "load"):
        assert re.search(r"\[OPTIONS\] [A-Z_]+", usage), usage
    if command == ("backup", "verify"):  # optional: `latest` when left out, as for restore and drill
        assert usage.rstrip().endswith("[OPTIONS] [BACKUP_ID]"), usage
    if command == ("restore",):  # a word that says what goes there; a flag shows none
        assert re.search(r"--backup +ID ", text) and re.search(r"--jobs +N ", text), text
        assert re.search(r"--json +Print", text), text


@pytest.mark.parametrize("command", MAIN_COMMANDS + OTHER_COMMANDS, ids=" ".join)
def test_help_paragraphs_wrap_at_the_terminal_width(command):
    """On a wide terminal every paragraph, and every command's and option's description, is
    one line: a break inside one was made by the source's docstring, and shows mid-sentence
    on an 80-column terminal."""
    text = help_of(*command, columns=2000)
    lines = prose(text)
    for above, below in zip(lines, lines[1:]):
        if above.strip() and below.strip() and not below.startswith((EXAMPLE, " - ")):
            assert above.startswith(EXAMPLE), f"a paragraph broken in two:\n{above}\n{below}"
    # (An optional argument's row starts indented too: `│   BACKUP_ID    A backup id ...`.)
    continued = [line for line in text.splitlines()
                 if re.match(r"^│ {3,}[^-*\s]", line) and not re.match(r"^│ {3}[A-Z_]+ {2,}\S", line)]
    assert not continued, f"a description broken in two: {continued}"


@pytest.mark.parametrize("command", MAIN_COMMANDS, ids=" ".join)
def test_main_commands_end_with_examples(command):
    lines = prose(help_of(*command))
    assert " Examples:" in lines, lines
    examples = [line.strip() for line in lines[lines.index(" Examples:"):] if line.startswith(EXAMPLE)]
    assert any(line.startswith(" ".join(("maestro", *command))) for line in examples), examples


def test_version_is_the_installed_packages():
    from importlib.metadata import version

    shown = run_maestro("--version")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"maestro {version('maestro-pipelines')}\n"
    assert "--version" in help_of()
