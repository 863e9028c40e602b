"""Extractors: open a source database named by its URL and stream one SELECT's rows.

    source = await connect(config.sources["shop"], config.path.parent, name="shop")
    async with source, source.read("SELECT ...", chunk_rows=5000) as result:
        async for rows in result.chunks():
            ...

One module per database (`postgres`, `mysql`, `sqlite`) behind the Protocol in `base`. The
helpers here are shared by those modules: reading a server URL and writing error messages that
name the source without its password.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from manta_async.config import SourceConfig, mask_url
from manta_async.errors import SourceError
from manta_async.extract.base import Column, Result, Row, Source

__all__ = ["Column", "Origin", "Result", "Row", "ServerUrl", "Source", "connect", "mask_url"]


@dataclass(frozen=True)
class Origin:
    """Where a source is configured, for error messages: its masked URL and config section."""

    url: str = field(repr=False)
    name: str | None = None

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    @property
    def section(self) -> str:
        return f"[sources.{self.name}]" if self.name else "the source's section of the config"

    def error(self, what: str, detail: str, advice: str) -> SourceError:
        """Return a SourceError saying what failed at this source, the driver's words, and
        what to do; the password is scrubbed from the driver's words in case it echoes it."""
        for secret in _secrets(self.url):
            detail = detail.replace(secret, "***")
        detail = f": {detail}" if detail else ""
        return SourceError(f"{what} {self.masked}{detail}; {advice}")

    def unreachable(self, detail: str) -> SourceError:
        return self.error(
            "cannot connect to",
            detail,
            f"is the server running? check url in {self.section}",
        )

    def refused(self, user: str, detail: str) -> SourceError:
        return self.error(
            f"user {user!r} was refused by",
            detail,
            f"check the user and password in the url in {self.section}",
        )

    def unknown_database(self, database: str, detail: str) -> SourceError:
        return self.error(
            f"database {database!r} does not exist on",
            detail,
            f"check the database name in the url in {self.section}",
        )

    def timed_out(self, timeout_s: float) -> SourceError:
        return self.error(
            f"no answer within connect_timeout_s = {timeout_s:g} s from",
            "",
            f"is the server running and reachable? check url in {self.section}",
        )

    def query_failed(self, detail: str) -> SourceError:
        return self.error(
            "the SELECT failed on",
            detail,
            "check the table's sql against this database",
        )

    def lost(self, detail: str) -> SourceError:
        return self.error(
            "lost the connection while reading from",
            detail,
            "the partial result was discarded; the next run reads it again",
        )


@dataclass(frozen=True)
class ServerUrl:
    """The parts of a postgresql:// or mysql:// URL, with user and password percent-decoded."""

    host: str | None
    port: int | None
    user: str | None
    password: str = field(repr=False)
    database: str | None

    @classmethod
    def parse(cls, url: str, origin: Origin) -> ServerUrl:
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            advice = f"remove them from the url in {origin.section}"
            raise origin.error("options after '?' or '#' are not supported in", "", advice)
        database = unquote(parts.path.lstrip("/")) or None
        return cls(
            host=parts.hostname,
            port=_port(parts, origin),
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else "",
            database=database,
        )


def _port(parts: SplitResult, origin: Origin) -> int | None:
    try:
        return parts.port
    except ValueError as exc:
        advice = f"fix the url in {origin.section}"
        raise origin.error("the port is not a number from 0 to 65535 in", "", advice) from exc


def _secrets(url: str) -> list[str]:
    # Both spellings: a driver may echo the password as written or as decoded.
    password = urlsplit(url).password
    if not password:
        return []
    return sorted({password, unquote(password)}, key=len, reverse=True)


async def connect(source: SourceConfig, base_dir: Path, name: str | None = None) -> Source:
    """Open the source database `source` names; `base_dir` resolves a relative SQLite path.

    `name` is the source's key under [sources] and only makes error messages more precise.
    Raises SourceError when the database cannot be reached or refuses the connection.
    """
    # The driver modules are imported on demand so that a SQLite-only setup never loads the
    # network drivers, and so that they can import the helpers above without a cycle.
    scheme = source.scheme
    if scheme in ("postgresql", "postgres"):
        from manta_async.extract import postgres

        return await postgres.connect(source, name)
    if scheme in ("mysql", "mariadb"):
        from manta_async.extract import mysql

        return await mysql.connect(source, name)
    if scheme == "sqlite":
        from manta_async.extract import sqlite

        return await sqlite.connect(source, base_dir, name)
    raise SourceError(f"no extractor for the scheme {scheme!r} of {mask_url(source.url)}")
