"""How sizes and times read to people, the same in the CLI's tables, its progress bars and the library's messages."""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """`1 drill`, `2 drills`, `0 drills`, `1,234 rows`: a count with its noun in the right number
    (`plural` for nouns that do not just take an s: `btree indexes`)."""
    return f"{count:,} {singular if count == 1 else plural or singular + 's'}"


def human_bytes(size: float) -> str:
    """1,234 B, 12.3 KiB, 4.5 MiB, 6.7 GiB, then TiB: binary multiples, named as such (like git),
    so a size never reads as two different numbers in two places."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def human_duration(seconds: float) -> str:
    """42 s, 12 min 5 s, 3 h 12 min, 2 days 4 h: two units at most, the larger first."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} days {hours} h" if hours else f"{days} days"


def human_age(seconds: float) -> str:
    """How long ago: `3 h 12 min ago`, `just now` under a second (a clock a little behind
    the store's is not a time in the future)."""
    return "just now" if seconds < 1 else f"{human_duration(seconds)} ago"
