"""Policies, one home each, for everything that applies or judges them: the RPO target (the
RPO sensor, the drill's default target, `maestro backup info`), the retention counts
(`maestro backup retention`, the retention job and its schedule, the library's
`RetentionPolicy`) and the quality gates' defaults (tenants, `maestro tenants add`, judged by
`ml/gates.py`). Dagster-free, importing nothing of the package, so every layer (the CLI, the
libraries, the definitions) reads the same numbers."""

from __future__ import annotations

from datetime import timedelta

RPO_TARGET = timedelta(hours=26)
"""Oldest acceptable snapshot of the latest verified backup: a day between nightly backups,
plus two hours for the backup to run and for DST days (25 h between two 02:00s)."""
RPO_TARGET_HOURS = RPO_TARGET.total_seconds() / 3600
"""RPO_TARGET in hours, as the drill's option and config take it (`--rpo-hours`)."""

RPO_WARNING_MARGIN = timedelta(hours=1)
"""`maestro backup info` warns this long before the target is missed: the nightly backup is
then overdue (it normally lands 24 h after the last one), with time left to take one by hand."""

PITR_RPO_TARGET = timedelta(seconds=60)
"""Where WAL is archived (the physical tier): the newest archived WAL at most this old. The
embedded default's archive_timeout (60 s) switches segments that often; the WAL RPO sensor
alerts past it and the PITR drill's measured RPO is checked against it."""
PITR_RTO_TARGET = timedelta(minutes=15)
"""The PITR drill: from the start of recovery to the recovered server checked (pg_amcheck)."""

DAILY_BACKUPS_KEPT = 7
"""Retention: days (with at least one backup) whose latest backup is kept."""
MONTHLY_ARCHIVES_KEPT = 12
"""Retention: monthly archives kept (the latest months): a restore point a month for a year."""
BASE_BACKUPS_KEPT = 7
"""Retention of the physical tier: the latest base backups kept (an incremental's parents with it)."""
BASE_BACKUP_MAX_AGE = timedelta(days=14)
"""Retention of the physical tier: base backups younger than this are kept whatever their count, so
the recovery window reaches back this far (WAL from the oldest kept one's start on is kept)."""
INCREMENTAL_CHAIN_MAX = 7
"""Base backups in one chain (a full one and its incrementals) before `auto` takes a full one again:
a nightly base backup makes it a weekly full, and a recovery combines at most this many."""

DEFAULT_GATES = {"accuracy": 0.70, "f1": 0.65, "roc_auc": 0.70}
"""The metric floors of a tenant that sets none (`maestro tenants add --min-accuracy ...`)."""
DEFAULT_REGRESSION_TOLERANCE = 0.02
"""How far a new model's metric may fall below the production model's (`--regression-tolerance`)."""
