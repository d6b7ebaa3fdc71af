"""Alembic environment: runs migrations on the connection Maestro hands over.

`maestro_pipelines.platform_db.migrate` passes an open connection in
`config.attributes["connection"]`; a developer running the `alembic` command from a checkout
gets the configured platform database (embedded server or MAESTRO_DATABASE_URL).
"""

from alembic import context

from maestro_pipelines.errors import MaestroError

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from maestro_pipelines.platform_db.connection import connect
    from maestro_pipelines.platform_db.location import locate_platform_database
    from maestro_pipelines.settings import load_settings

    location = locate_platform_database(load_settings())
    with connect(location.platform_url, location.source) as conn:
        _run(conn)
        conn.commit()


def _run(connection) -> None:
    # One transaction per revision: a failing revision rolls back alone and the database
    # stays at the last good one (PostgreSQL runs DDL inside transactions).
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise MaestroError(
        "offline (--sql) migrations are not supported",
        "Several revisions inspect the server (extensions, dates); run them against a database",
    )
run_migrations_online()
