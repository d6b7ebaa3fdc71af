"""The connectors Maestro knows, one registration line each, and the URL routing over them.

    postgresql://USER:PASSWORD@HOST:5432/DATABASE           postgres.py (also postgres://)
    mysql://USER:PASSWORD@HOST:3306/DATABASE                mysql.py (also mysql+pymysql://, mariadb://)
    mongodb://USER:PASSWORD@HOST:27017/DATABASE?...         mongodb.py (also mongodb+srv://)
    snowflake://USER[:PASSWORD]@ACCOUNT/DATABASE/SCHEMA?warehouse=WH[&role=&host=&port=&protocol=]
                                                            snowflake.py (password from the URL
                                                            or MAESTRO_SOURCE_PASSWORD)
    bigquery://PROJECT/DATASET[?location=EU&api_endpoint=http://HOST:PORT]
                                                            bigquery.py

Any of them may add Maestro's own settings as query parameters: `table`, `tenant_column`,
`timestamp_column`, `key_column` (`...?table=events&tenant_column=customer`).

Each connector's module declares everything about it once (`CONNECTOR =
ConnectorDeclaration(...)`: schemes, pip extra and driver modules, URL rules, how to open
it); adding one is its module plus one `register(...)` line below. Nothing here imports a
driver: whether one is installed is looked up on sys.path.
"""

from __future__ import annotations

from typing import Any

from maestro_pipelines.connectors import bigquery, mongodb, mysql, postgres, snowflake
from maestro_pipelines.connectors.base import SOURCE_URL_VARIABLE, ConnectorDeclaration, SourceReader, check_driver
from maestro_pipelines.errors import MaestroError

CONNECTORS: dict[str, ConnectorDeclaration] = {}
"""Registered connectors by name, in registration order (the order "Use one of" lists them)."""


def register(declaration: ConnectorDeclaration) -> ConnectorDeclaration:
    """Make a connector known: its name and each of its schemes must be new."""
    taken = {scheme: other.name for other in CONNECTORS.values() for scheme in other.schemes}
    clash = sorted(s for s in declaration.schemes if s in taken)
    if declaration.name in CONNECTORS or clash or not declaration.schemes:
        raise ValueError(f"connector {declaration.name!r}: name or schemes {clash} already registered, or no scheme")
    CONNECTORS[declaration.name] = declaration
    return declaration


def unregister(name: str) -> None:
    """Forget a connector (tests that register a fake one)."""
    CONNECTORS.pop(name, None)


register(postgres.CONNECTOR)
register(mysql.CONNECTOR)
register(mongodb.CONNECTOR)
register(snowflake.CONNECTOR)
register(bigquery.CONNECTOR)


def supported_schemes() -> tuple[str, ...]:
    """Each connector's main scheme, as "Use one of ..." lists them."""
    return tuple(declaration.schemes[0] for declaration in CONNECTORS.values())


def _supported() -> str:
    return ", ".join(f"{s}://" for s in supported_schemes())


def connector_named(name: str) -> ConnectorDeclaration:
    try:
        return CONNECTORS[name]
    except KeyError:
        raise MaestroError(f"no data connector named '{name}' is registered", f"Use one of {_supported()}") from None


def connector_for_url(url: object, variable: str = SOURCE_URL_VARIABLE) -> ConnectorDeclaration:
    """The connector whose scheme `url` uses (`postgresql+psycopg2://` counts as `postgresql`)."""
    if not isinstance(url, str) or not url.strip():
        raise MaestroError(f"{variable} is empty", f"Set it to a URL: {_supported()}")
    scheme, sep, _ = url.strip().partition("://")
    if not sep or not scheme:
        raise MaestroError(f"{variable} is not a URL (no scheme://)", f"Write it as one of {_supported()}")
    scheme = scheme.lower()
    by_scheme = {s: declaration for declaration in CONNECTORS.values() for s in declaration.schemes}
    declaration = by_scheme.get(scheme) or by_scheme.get(scheme.split("+")[0])  # postgresql+psycopg2, mysql+pymysql
    if declaration is None:
        shown = scheme if len(scheme) <= 30 and scheme.replace("+", "").isalnum() else "?"
        raise MaestroError(f"{variable} uses the scheme '{shown}', which Maestro cannot read", f"Use one of {_supported()}")
    return declaration


def check_drivers(declaration: ConnectorDeclaration, variable: str = SOURCE_URL_VARIABLE) -> None:
    """Fail now, with the pip extra to install, when the connector's driver is missing."""
    if declaration.extra is not None:
        for driver in declaration.drivers:
            check_driver(driver, declaration.extra, variable, declaration.label)


def checked_url_settings(url: str, variable: str = SOURCE_URL_VARIABLE) -> tuple[ConnectorDeclaration, dict[str, Any]]:
    """(connector, the settings safe to show) for `url`, its form and driver checked now."""
    declaration = connector_for_url(url, variable)
    check_drivers(declaration, variable)
    return declaration, dict(declaration.url_settings(url, variable))


def open_source(url: str, variable: str = SOURCE_URL_VARIABLE, **fields: Any) -> SourceReader:
    """A reader for `url` outside Dagster (scripts, the thin resources); `fields` override
    the settings read from the URL (`table=...`, `key_column=...`)."""
    declaration, settings = checked_url_settings(url, variable)
    return declaration.open(**{**settings, "url_variable": variable, **fields, "url": url})
