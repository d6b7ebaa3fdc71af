"""How `maestro --help` reads: the conventions of well-made command lines (git, gh, pgBackRest).

- Commands in groups, in the order people need them (LAYOUT), not in the order the code
  registers them.
- A flag shows no type (`--json`, not `--json <bool>`); a value shows a word in capitals
  (`--backup ID`, `--jobs N`); an argument is NAME in the usage line, [NAME] when optional
  (Typer 0.2x writes `<bool>` on every flag and `{name}` for a required argument).
- Each paragraph of a command's help is one line that the terminal wraps: docstrings keep
  their line breaks in the source, and Typer's rich mode would print them as they are, broken
  mid-sentence at 80 columns. Indented lines (examples) and bullets stay on their own line.
- The main commands end with examples (in their docstrings; EXAMPLES for the commands whose
  docstrings have none).
"""

from __future__ import annotations

import inspect

# The main help's panels, in this order, each with its commands in order.
LAYOUT: dict[str, tuple[str, ...]] = {
    "Everyday": ("tenants", "demo", "mlflow"),
    "Backups & recovery": ("backup", "restore", "drill", "wal"),
    "Database": ("db",),
}
# Subcommands in the order of use; any not named here follow, as registered.
ORDER: dict[str, tuple[str, ...]] = {
    "tenants": ("add", "load", "list"),
    "backup": ("info", "run", "list", "verify", "archive", "retention", "keygen", "rekey", "automation"),
    "restore": ("status", "finish", "undo", "cleanup"),
    "drill": ("list",),
    "wal": ("status", "push", "fetch"),
    "backup automation": ("status", "on", "off"),
    "db": ("status", "upgrade", "downgrade", "start", "stop"),
}
# Examples for commands whose own help has none (command path below `maestro`).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "backup list": ("maestro backup list", "maestro backup list --monthly", "maestro backup list --json"),
    "backup info": ("maestro backup info", "maestro backup info --json"),
    "tenants add": ("maestro tenants add umbrella", "maestro tenants add umbrella --display-name Umbrella --min-f1 0.7"),
    "tenants load": ("maestro tenants load umbrella umbrella.csv",),
}
_VALUE_WORDS = {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH", "datetime": "TIME",
                "int range": "N", "float range": "NUMBER"}


def reflow(text: str | None) -> str | None:
    """Each paragraph of `text` on one line, but indented lines and bullets kept on their own."""
    if not text:
        return text
    body, feed, rest = inspect.cleandoc(text).partition("\f")
    paragraphs = []
    for paragraph in body.split("\n\n"):
        lines: list[str] = []
        for line in paragraph.split("\n"):
            verbatim = line[:1].isspace() or line.lstrip().startswith(("- ", "* "))
            if lines and not verbatim and not lines[-1][:1].isspace():
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
            else:
                lines.append(line.rstrip())
        paragraphs.append("\n".join(lines))
    # Typer dedents what follows the first paragraph as one block, ignoring its first line: an
    # "Examples:" heading followed only by indented lines would lose their indent. A blank
    # line first (not shown: Typer drops leading blank lines) keeps the heading in the count.
    first, *later = paragraphs
    return first + ("\n\n\n" + "\n\n".join(later) if later else "") + feed + rest


def _with_examples(text: str | None, examples: tuple[str, ...]) -> str:
    block = "\n".join(f"    {example}" for example in examples)
    return f"{text or ''}\n\nExamples:\n\n{block}"


def tidy(command, path: str = "") -> None:
    """Reflow every command's help, add missing examples, and put subcommands in LAYOUT and ORDER."""
    if path in EXAMPLES and "Example" not in (command.help or ""):
        command.help = _with_examples(inspect.cleandoc(command.help or ""), EXAMPLES[path])
    command.help = reflow(command.help)
    command.short_help = reflow(command.short_help)
    subcommands = getattr(command, "commands", None)
    if not subcommands:
        return
    if not path:
        wanted = [name for names in LAYOUT.values() for name in names]
        for panel, names in LAYOUT.items():
            for name in names:
                if name in subcommands:
                    subcommands[name].rich_help_panel = panel
    else:
        wanted = list(ORDER.get(path, ()))
    ordered = {name: subcommands[name] for name in wanted if name in subcommands}
    ordered.update((name, sub) for name, sub in subcommands.items() if name not in ordered)
    subcommands.clear()
    subcommands.update(ordered)
    for name, sub in subcommands.items():
        tidy(sub, f"{path} {name}".strip())


def conventional_parameters() -> None:
    """Flags without a type, values with a word in capitals, arguments as NAME / [NAME].

    Typer 0.2x (its own copy of click) has these hooks; older Typer shows click's own
    conventions already and is left as it is."""
    from typer import core

    option, argument = core.TyperOption, core.TyperArgument
    if getattr(option, "_maestro_conventional", False) or not hasattr(argument, "_usage_display_name"):
        return
    typed = option.display_type_rich

    def option_value(self, ctx):
        if self.metavar is not None:
            return self.metavar
        if self.is_flag or self.count:
            return None
        shown = (typed(self, ctx) or "").strip("<>")
        return _VALUE_WORDS.get(shown, shown.upper() if "|" not in shown else shown)

    def argument_name(self) -> str:
        return self.metavar or (self.name or "").upper()

    def argument_usage(self) -> str:
        name = argument_name(self) + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"

    option.display_type_rich = option_value
    argument.display_name_raw = property(argument_name)
    argument.display_type_rich = lambda self, ctx: None
    argument._usage_display_name = argument_usage
    option._maestro_conventional = True
