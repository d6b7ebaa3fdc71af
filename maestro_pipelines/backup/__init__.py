"""The backup and restore library: pg_dump/pg_restore, manifests, verification, retention.

It never imports Dagster, so the `maestro` CLI can restore when the orchestrator (or its own
database) is the thing that was lost. Built by the backups and restore issues.
"""
