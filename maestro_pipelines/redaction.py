"""Hiding a secret (a password) in a message that may quote it.

A long secret is replaced wherever it appears. A short one (a one-letter test password is
common) would match inside ordinary words and turn the whole message into `***` soup, so it
is replaced only where client libraries quote passwords: `user:SECRET@host`, `password=SECRET`
and `'SECRET'` / `"SECRET"`.
"""

from __future__ import annotations

import re
from urllib.parse import quote

MASK = "***"
SHORT_SECRET = 6
"""Secrets shorter than this are replaced only where they stand as a password."""


def hide_secret(text: str, secret: object) -> str:
    """`text` with `secret` (and its URL-quoted form) replaced by `***`."""
    if secret is None or not str(secret):
        return text
    value = str(secret)
    forms = {value, quote(value, safe="")}
    for form in sorted(forms, key=len, reverse=True):
        if len(form) >= SHORT_SECRET:
            text = text.replace(form, MASK)
            continue
        escaped = re.escape(form)
        text = re.sub(rf"(?<=:){escaped}(?=@)", MASK, text)
        text = re.sub(rf"(?i)(?<=password=){escaped}(?=$|[\s&;,'\"])", MASK, text)
        text = re.sub(rf"(?<=')({escaped})(?=')|(?<=\"){escaped}(?=\")", MASK, text)
    return text
