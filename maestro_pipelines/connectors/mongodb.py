"""MongoDB connector through pymongo (`pip install 'maestro-pipelines[mongodb]'`).

`table` is the collection. Reads are `find` queries: `{tenant_column: tenant}` (a bound
value: a non-string tenant such as `{"$ne": None}` is refused before any query), the
optional `filter` from the configuration ANDed to it, and `{timestamp_column: {"$gt": since}}`.
Rows are ordered by the timestamp then `_id`; batches come from one server cursor.
`tenant_fingerprint` is `count_documents` plus the newest document (sort, limit 1), both
answered from an index on (tenant, timestamp) and both plain enough for every MongoDB
wire-compatible server. `aggregate` runs your pipeline, after a `$match` on the tenant when
you pass one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import unquote

from maestro_pipelines.connectors.base import (
    ConnectorDeclaration,
    DataFingerprint,
    SourceReader,
    check_tenant,
    empty_frame,
    fingerprints_from_groups,
    finish_frame,
    first_line,
    import_driver,
    malformed,
    read_request,
    redact,
    split_query,
    to_utc,
    url_fields,
)
from maestro_pipelines.errors import MaestroError

if TYPE_CHECKING:
    import pandas as pd

MONGODB_URL_FORM = "mongodb://USER:PASSWORD@HOST:27017/DATABASE"
MONGODB_SCHEMES = ("mongodb", "mongodb+srv")


class MongoURL:
    """A parsed mongodb:// URL: what pymongo gets, and what may be shown."""

    def __init__(self, uri: str, hosts: str, database: str | None, password: str | None, username: str | None):
        self.uri = uri  # for pymongo: Maestro's own parameters removed
        self.hosts = hosts
        self.database = database
        self.password = password
        self.username = username


def parse_mongodb_url(raw: str, variable: str) -> tuple[MongoURL, dict[str, str]]:
    """(the URL for pymongo, Maestro's fields) from `mongodb://[user:pw@]host[:port][,...]/[db][?opts]`."""
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep or scheme.lower() not in MONGODB_SCHEMES:
        raise malformed(variable, MONGODB_URL_FORM)
    netloc, _, tail = rest.partition("/")
    if "?" in netloc:  # mongodb://host?opts (no slash before the options)
        netloc, _, query = netloc.partition("?")
        path = ""
    else:
        path, _, query = tail.partition("?")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    if not hosts:
        raise malformed(variable, MONGODB_URL_FORM, "names no host")
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if colon and (not port.isdigit() or not name):
            raise malformed(variable, MONGODB_URL_FORM)
        if scheme.lower() == "mongodb+srv" and colon:
            raise malformed(variable, "mongodb+srv://USER:PASSWORD@CLUSTER.EXAMPLE.NET/DATABASE", "gives a port to mongodb+srv")
    username, _, password = userinfo.partition(":")
    database = unquote(path) or None
    if database is not None and any(c in database for c in '/\\. "$'):
        raise malformed(variable, MONGODB_URL_FORM, f"names an invalid database '{database}'")
    ours, rest_query = split_query(query)
    from urllib.parse import urlencode

    uri = f"{scheme}://{netloc}/{path}" + (f"?{urlencode(rest_query)}" if rest_query else "")
    return (
        MongoURL(uri, hosts, database, unquote(password) or None, unquote(username) or None),
        url_fields(ours, variable),
    )


def mongodb_url_settings(raw: str, variable: str) -> dict[str, Any]:
    """Maestro's settings and the database from the URL: never the password."""
    parsed, fields = parse_mongodb_url(raw, variable)
    return {**fields, **({"database": parsed.database} if parsed.database else {})}


@dataclass(kw_only=True, eq=False, repr=False)
class MongoReader(SourceReader):
    """Training rows in a MongoDB collection (`table`), one document per row."""

    url: str
    database: Optional[str] = None  # empty: the database named in the URL
    filter: Optional[dict[str, Any]] = None  # ANDed to every read: narrows a tenant, never widens it
    connect_timeout_seconds: int = 10

    _client: Any = field(default=None, init=False)

    # ---- connection ----

    def _parsed(self) -> MongoURL:
        return parse_mongodb_url(self.url, self._variable)[0]

    def _new_client(self, parsed: MongoURL):
        """A pymongo client (tests substitute an in-process mongomock client here)."""
        pymongo = import_driver("pymongo", "mongodb", self._variable, "MongoDB")
        timeout_ms = self.connect_timeout_seconds * 1000
        return pymongo.MongoClient(
            parsed.uri,
            tz_aware=True,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            appname="maestro",
        )

    def _collection(self):
        table, _, _, _ = self._checked_names()
        parsed = self._parsed()
        database = self.database or parsed.database
        if not database:
            raise MaestroError(
                f"{self._variable} names no database", f"Write it as {MONGODB_URL_FORM} or set the source's database"
            )
        if self._client is None:
            try:
                self._client = self._new_client(parsed)
            except MaestroError:
                raise
            except Exception as exc:  # pymongo.errors.ConfigurationError / InvalidURI and friends
                raise MaestroError(
                    f"{self._variable} is not a usable MongoDB URL ({redact(first_line(exc), parsed.password)})",
                    f"Write it as {MONGODB_URL_FORM}",
                ) from None
        return self._client[database][table]

    def _translate(self, exc: BaseException) -> MaestroError:
        parsed = self._parsed()
        source, where = self._variable, f"{parsed.hosts}/{self.database or parsed.database}"
        name = type(exc).__name__
        code = getattr(exc, "code", None)
        message = redact(first_line(exc), parsed.password)
        if name in ("ServerSelectionTimeoutError", "AutoReconnect", "NetworkTimeout", "ConnectionFailure"):
            return MaestroError(
                f"{source}: no MongoDB server answered at {parsed.hosts} within {self.connect_timeout_seconds} s",
                f"Start the server or fix the hosts in {source}",
            )
        if code == 18 or "authentication failed" in message.lower():
            return MaestroError(
                f"{source}: authentication failed for user '{parsed.username or ''}' at {parsed.hosts}",
                f"Check the user and password in {source}",
            )
        if code == 13:
            return MaestroError(
                f"{source}: not authorized to read {self.table} at {where}", f"Grant the user in {source} read access"
            )
        return MaestroError(f"{source}: cannot read from MongoDB at {where} ({message})")

    def _run(self, operation):
        """Call `operation()`, turning pymongo's errors into one line."""
        from pymongo.errors import PyMongoError

        try:
            return operation()
        except PyMongoError as exc:
            raise self._translate(exc) from None

    # ---- queries ----

    def _query(self, tenant: str, since=None) -> dict:
        _, tenant_column, timestamp_column, _ = self._checked_names()
        clauses: list[dict] = [{tenant_column: tenant}]
        if since is not None:
            clauses.append({timestamp_column: {"$gt": since}})
        if self.filter:
            if not isinstance(self.filter, dict):
                raise MaestroError("the source's filter must be a MongoDB query document (a dict)")
            clauses.append(self.filter)
        return clauses[0] if len(clauses) == 1 else {"$and": clauses}

    def _sort(self) -> list[tuple[str, int]]:
        _, _, timestamp_column, key = self._checked_names()
        return [(timestamp_column, 1), (key or "_id", 1)]

    @staticmethod
    def _projection(columns) -> dict:
        if columns is None:
            return {"_id": 0}
        projection = {c: 1 for c in columns}
        if "_id" not in columns:
            projection["_id"] = 0
        return projection

    def _frame(self, documents: list[dict], columns) -> "pd.DataFrame":
        import pandas as pd

        if not documents:
            return finish_frame(empty_frame(columns), self.timestamp_column)
        frame = pd.DataFrame.from_records(documents, columns=list(columns) if columns else None)
        if "_id" in frame.columns:
            frame["_id"] = frame["_id"].map(lambda v: v if v is None or isinstance(v, (str, int, float)) else str(v))
        return finish_frame(frame, self.timestamp_column)

    def read_tenant_rows(self, tenant, *, columns=None, since=None, limit=None) -> "pd.DataFrame":
        request = read_request(tenant, columns, since, limit)
        if request.limit == 0:
            return self._frame([], request.columns)
        collection = self._collection()

        def run():
            cursor = collection.find(self._query(request.tenant, request.since), self._projection(request.columns))
            cursor = cursor.sort(self._sort())
            if request.limit is not None:
                cursor = cursor.limit(request.limit)
            return list(cursor)

        return self._frame(self._run(run), request.columns)

    def _batches(self, request, batch_size: int) -> Iterator["pd.DataFrame"]:
        from pymongo.errors import PyMongoError

        collection = self._collection()
        try:
            cursor = collection.find(self._query(request.tenant, request.since), self._projection(request.columns))
            cursor = cursor.sort(self._sort()).batch_size(batch_size)
            try:
                pending: list[dict] = []
                for document in cursor:
                    pending.append(document)
                    if len(pending) == batch_size:
                        yield self._frame(pending, request.columns)
                        pending = []
                if pending:
                    yield self._frame(pending, request.columns)
            finally:
                cursor.close()
        except PyMongoError as exc:
            raise self._translate(exc) from None

    def tenant_fingerprint(self, tenant) -> DataFingerprint:
        tenant = check_tenant(tenant)
        _, _, timestamp_column, _ = self._checked_names()
        collection = self._collection()
        query = self._query(tenant)

        def run():
            count = collection.count_documents(query)
            newest = collection.find_one(
                {"$and": [query, {timestamp_column: {"$ne": None}}]},
                {timestamp_column: 1, "_id": 0},
                sort=[(timestamp_column, -1)],
            )
            return count, (newest or {}).get(timestamp_column)

        count, newest = self._run(run)
        return DataFingerprint(row_count=int(count), newest=to_utc(newest) if count else None)

    def tenant_fingerprints(self, tenants, *, deadline: float | None = None) -> dict[str, DataFingerprint]:
        """Every tenant's fingerprint from one aggregation: the configured filter, then a
        $group by tenant ($max skips documents without a timestamp, as find_one's does)."""
        tenants = [check_tenant(t) for t in tenants]
        _, tenant_column, timestamp_column, _ = self._checked_names()
        if self.filter and not isinstance(self.filter, dict):
            raise MaestroError("the source's filter must be a MongoDB query document (a dict)")
        group = {"$group": {"_id": f"${tenant_column}", "row_count": {"$sum": 1},
                            "newest": {"$max": f"${timestamp_column}"}}}
        pipeline = ([{"$match": self.filter}] if self.filter else []) + [group]
        collection = self._collection()
        documents = self._run(lambda: list(collection.aggregate(pipeline)))
        return fingerprints_from_groups(
            ((d["_id"], d["row_count"], _group_date(d.get("newest"))) for d in documents), tenants)

    def aggregate(self, pipeline: list[dict], *, tenant: str | None = None) -> "pd.DataFrame":
        """Run an aggregation pipeline; with `tenant`, it starts with a `$match` on that tenant
        (and the configured filter), so the pipeline only ever sees the tenant's documents."""
        if not isinstance(pipeline, list) or not all(isinstance(stage, dict) for stage in pipeline):
            raise MaestroError("the pipeline must be a list of stage documents (dicts)", "Pass e.g. [{'$group': ...}]")
        stages = list(pipeline)
        if tenant is not None:
            stages.insert(0, {"$match": self._query(check_tenant(tenant))})
        elif self.filter:
            stages.insert(0, {"$match": self.filter})
        collection = self._collection()
        documents = self._run(lambda: list(collection.aggregate(stages)))
        return self._frame(documents, None)

    def describe(self) -> str:
        parsed = self._parsed()
        return f"MongoDB {parsed.hosts}/{self.database or parsed.database}, collection {self.table}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


CONNECTOR = ConnectorDeclaration(
    name="mongodb",
    label="MongoDB",
    schemes=MONGODB_SCHEMES,
    url_form=MONGODB_URL_FORM,
    url_settings=mongodb_url_settings,
    open=MongoReader,
    extra="mongodb",
    drivers=("pymongo",),
)


def _group_date(value):
    """A date from $group: some wire-compatible servers (nx-27017) answer with its extended
    JSON as text, '{"$date": "2024-03-01T09:14:00"}' (UTC, the zone dropped)."""
    if isinstance(value, str) and value.startswith('{"$date"'):
        import json

        return json.loads(value)["$date"]  # ISO text: to_utc reads it, naive as UTC
    return value
