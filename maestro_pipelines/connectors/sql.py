"""What the SQL connectors share (PostgreSQL and MySQL/MariaDB): SQLAlchemy 2 readers.

Values are bound with `text()` `:name` parameters; rows stream through server-side cursors
(`yield_per`: a named cursor on PostgreSQL, an unbuffered `SSCursor` on MySQL). Sessions run
in UTC (`SET LOCAL TIME ZONE` per transaction on PostgreSQL, `time_zone` at connect on MySQL),
so timestamp columns without a zone are read and compared as UTC. The connectors themselves
are `postgres.py` and `mysql.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from maestro_pipelines.connectors.base import (
    DataFingerprint,
    SQLDialect,
    SourceReader,
    check_identifier,
    check_query,
    empty_frame,
    check_tenant,
    fingerprint_sql,
    fingerprints_from_groups,
    finish_frame,
    grouped_fingerprint_sql,
    read_request,
    select_sql,
    to_utc,
)
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    from datetime import datetime

    import pandas as pd
    from sqlalchemy.engine import Connection, Engine


@dataclass(kw_only=True, eq=False, repr=False)
class SQLAlchemyReader(SourceReader):
    """What PostgreSQL and MySQL share: SQLAlchemy engines, `text()` queries, `read_query`."""

    _order_keys_cache: Optional[tuple[str, ...]] = field(default=None, init=False)

    # ---- per backend ----

    def _engine(self) -> "Engine":
        raise NotImplementedError

    def _dialect(self) -> SQLDialect:
        raise NotImplementedError

    def _translate(self, exc: BaseException) -> MaestroError:
        raise NotImplementedError

    def _prepare(self, conn: "Connection") -> None:
        """Per-transaction session settings."""

    def _since_value(self, since: "datetime"):
        return since

    # ---- shared ----

    @contextmanager
    def _connection(self) -> Iterator["Connection"]:
        """A read transaction; driver errors leave as one-line `MaestroError`s."""
        from sqlalchemy.exc import DBAPIError, NoSuchTableError

        engine = self._engine()
        try:
            conn = engine.connect()
        except DBAPIError as exc:
            raise self._translate(exc) from None
        try:
            with conn.begin():
                self._prepare(conn)
                yield conn
        except DBAPIError as exc:
            raise self._translate(exc) from None
        except NoSuchTableError:
            raise self._no_table() from None
        finally:
            conn.close()

    def _server(self) -> str:
        """host:port/database (or socket folder/database), for error messages."""
        raise NotImplementedError

    def _no_table(self) -> MaestroError:
        return MaestroError(
            f"{self._variable}: table '{self.table}' does not exist at {self._server()}",
            "Create it, or set the source's table",
        )

    def _table_sql(self) -> str:
        return self._dialect().quote(self._checked_names()[0])

    def _order_keys(self, conn: "Connection") -> tuple[str, ...]:
        """The tiebreak after the timestamp: key_column, else the table's primary key."""
        table, _, _, key = self._checked_names()
        if key:
            return (key,)
        if self._order_keys_cache is None:
            from sqlalchemy import inspect

            schema, _, name = table.rpartition(".")
            primary = inspect(conn).get_pk_constraint(name, schema=schema or None)
            columns = tuple(primary.get("constrained_columns") or ())
            try:
                columns = tuple(check_identifier(c, "primary key column") for c in columns)
            except MaestroError:
                columns = ()  # a name we cannot quote safely: order by the timestamp alone
            self._order_keys_cache = columns
        return self._order_keys_cache

    def _select(self, conn: "Connection", request) -> tuple[str, dict]:
        _, tenant_column, timestamp_column, _ = self._checked_names()
        since = self._since_value(request.since) if request.since is not None else None
        return select_sql(
            self._dialect(), self._table_sql(), tenant_column, timestamp_column, self._order_keys(conn), request, since
        )

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None) -> "pd.DataFrame":
        import pandas as pd
        from sqlalchemy import text

        request = read_request(tenant, columns, since, limit)
        self._checked_names()
        with self._connection() as conn:
            sql, params = self._select(conn, request)
            result = conn.execute(text(sql), params)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        return finish_frame(frame, self.timestamp_column)

    def _batches(self, request, batch_size: int) -> Iterator["pd.DataFrame"]:
        import pandas as pd
        from sqlalchemy import text

        with self._connection() as conn:
            sql, params = self._select(conn, request)
            result = conn.execution_options(yield_per=batch_size).execute(text(sql), params)
            keys = list(result.keys())
            for rows in result.partitions(batch_size):
                yield finish_frame(pd.DataFrame(rows, columns=keys), self.timestamp_column)

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        from sqlalchemy import text

        request = read_request(tenant)
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = fingerprint_sql(self._dialect(), self._table_sql(), tenant_column, timestamp_column)
        with self._connection() as conn:
            count, newest = conn.execute(text(sql), {"tenant": request.tenant}).one()
        return DataFingerprint(row_count=int(count), newest=to_utc(newest) if count else None)

    def tenant_fingerprints(self, tenants, *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """Every tenant's fingerprint from one GROUP BY query (`deadline` is not needed)."""
        from sqlalchemy import text

        tenants = [check_tenant(t) for t in tenants]
        _, tenant_column, timestamp_column, _ = self._checked_names()
        sql = grouped_fingerprint_sql(self._dialect(), self._table_sql(), tenant_column, timestamp_column)
        with self._connection() as conn:
            return fingerprints_from_groups(conn.execute(text(sql)).all(), tenants)

    def read_query(self, sql: str, params: Mapping[str, Any] | None = None) -> "pd.DataFrame":
        """Run your own SELECT with `:name` placeholders; every value in `params` is bound.

        It runs in a read-only transaction. Tenant isolation is yours here: filter on the
        tenant with a bound `:tenant`.
        """
        import pandas as pd
        from sqlalchemy import text

        check_query(sql, params, ":name")
        with self._connection() as conn:
            result = conn.execute(text(sql), dict(params or {}))
            if not result.returns_rows:
                return empty_frame(None)
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        return finish_frame(frame, self.timestamp_column)
