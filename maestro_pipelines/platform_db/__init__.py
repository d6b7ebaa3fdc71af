"""The platform database, without Dagster: where it lives, how to connect, its migrations.

The CLI, the Dagster resources and the backup/restore library all come through here, so a
URL is parsed, a server started and an error translated in exactly one way.
"""

from maestro_pipelines.platform_db.location import DatabaseLocation, locate_platform_database

__all__ = ["DatabaseLocation", "locate_platform_database"]
