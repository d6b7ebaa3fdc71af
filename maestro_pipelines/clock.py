"""The backups' clock: MAESTRO_TIMEZONE checked, the day and the previous month in it.

The schedules (nightly backup, monthly archive, weekly drill), the `monthly_archive` asset's
default month and `maestro backup archive` read the calendar the same way. Outside the
backup package, whose imports are heavy: loading the definitions imports it.
"""

from __future__ import annotations

import zoneinfo
from datetime import date, datetime, timedelta, timezone

from maestro_pipelines.errors import MaestroError


def checked_timezone(name: str) -> str:
    """MAESTRO_TIMEZONE, checked: the clock of the backup schedules and of the default month
    to archive (asset, schedule and `maestro backup archive` alike)."""
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MaestroError(
            f"MAESTRO_TIMEZONE '{name}' is not a time zone", "Use an IANA name such as Europe/Berlin, or unset it for UTC"
        ) from None
    return name


def local_day(moment: datetime, tz: str) -> str:
    """The calendar day (YYYY-MM-DD) of `moment` in time zone `tz` (naive moments are UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(zoneinfo.ZoneInfo(tz)).date().isoformat()


def previous_month(moment: datetime, tz: str) -> str:
    """The month (YYYY-MM) before the one `moment` falls in, in time zone `tz`."""
    first = date.fromisoformat(local_day(moment, tz)).replace(day=1)
    return (first - timedelta(days=1)).strftime("%Y-%m")
