"""Recovery objectives, in one place for everything that judges them: the RPO sensor, the
drill's default target and `maestro backup info` (Dagster-free, so the CLI reads the same
number the sensor alerts on)."""

from __future__ import annotations

from datetime import timedelta

RPO_TARGET = timedelta(hours=26)
"""Oldest acceptable snapshot of the latest verified backup: a day between nightly backups,
plus two hours for the backup to run and for DST days (25 h between two 02:00s)."""

RPO_WARNING_MARGIN = timedelta(hours=1)
"""`maestro backup info` warns this long before the target is missed: the nightly backup is
then overdue (it normally lands 24 h after the last one), with time left to take one by hand."""
