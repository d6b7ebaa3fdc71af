"""Jobs: asset selections and op jobs launched by schedules, sensors and on-call.

Empty until the ML graph (rollback), backup and restore issues add theirs.
"""

all_jobs: list = []
