"""Maestro: one Dagster graph for an ML platform's whole life cycle.

Importing this package is cheap on purpose: Dagster loads `maestro_pipelines.definitions`
in every process it starts, so connectors, ML libraries and database drivers are imported
where they are used, never here.
"""

__version__ = "0.1.0"
