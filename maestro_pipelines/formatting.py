"""How sizes read to people, the same in the CLI's tables and the library's messages."""

from __future__ import annotations


def human_bytes(size: float) -> str:
    """1,234 B, 12.3 kB, 4.5 MB, 6.7 GB (binary multiples), then TB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TB"
