"""Sensors: tenant partitions, retraining, RPO breach, run-failure alerts.

Empty until the ML graph and backup issues add theirs.
"""

all_sensors: list = []
