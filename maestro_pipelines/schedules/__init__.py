"""Schedules: nightly backups, monthly archives, retention, weekly drills, daily upkeep.

Empty until the backup, drill and upkeep issues add theirs.
"""

all_schedules: list = []
