"""Alembic migrations of the platform database (run with `maestro db upgrade`)."""
