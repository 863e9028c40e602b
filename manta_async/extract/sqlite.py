"""The SQLite extractor, on aiosqlite.

The file is opened read-only through a `file:...?mode=ro` URI, so a mistyped path is an error
and never a new empty database. Each read runs in one transaction (BEGIN, then the SELECT),
so all its chunks come from one snapshot of the file; so does a read by buckets of keys
(`read_buckets`, see sqlite_buckets.py), whose passes over the rows all see the same rows.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aiosqlite

from manta_async.config import SourceConfig
from manta_async.extract import Origin
from manta_async.extract.base import Column, Row
from manta_async.extract.sqlite_buckets import SqliteBucketRead

logger = logging.getLogger(__name__)

_PROBE_VIEW = "_manta_async_columns"


async def connect(source: SourceConfig, base_dir: Path, name: str | None = None) -> SqliteSource:
    """Open the SQLite file `source.url` names, read-only; a relative path is under base_dir."""
    origin = Origin(source.url, name)
    path = database_path(source.url, base_dir, origin)
    sqlite_source = SqliteSource(path, origin, source.connect_timeout_s)
    await sqlite_source.open()
    return sqlite_source


def database_path(url: str, base_dir: Path, origin: Origin) -> Path:
    """Return the file `url` names: sqlite:///relative/file.db or sqlite:////absolute/file.db."""
    parts = urlsplit(url)
    if parts.netloc or parts.query or parts.fragment:
        raise origin.error(
            "a sqlite url has no host or options:",
            "",
            f"write sqlite:///relative/file.db or sqlite:////absolute/file.db in {origin.section}",
        )
    relative = unquote(parts.path)[1:]
    if not relative:
        advice = f"add the file's path to the url in {origin.section}"
        raise origin.error("no file is named in", "", advice)
    return base_dir / relative


class SqliteSource:
    """One read-only connection to a SQLite file; reads run one after another."""

    def __init__(self, path: Path, origin: Origin, connect_timeout_s: float) -> None:
        self._path = path
        self._origin = origin
        self._connect_timeout_s = connect_timeout_s
        self._conn: aiosqlite.Connection | None = None
        self._reading = False

    async def open(self) -> None:
        """Open the file, unless open already; raise SourceError if it cannot be read."""
        if self._conn is not None:
            return

        if not self._path.is_file():
            raise self._origin.error(
                "cannot open",
                f"no such file {self._path}",
                f"check the path in the url in {self._origin.section} (relative paths start "
                "at the config file's folder)",
            )

        uri = f"{self._path.resolve().as_uri()}?mode=ro"
        # isolation_level=None leaves transactions to us: the module would otherwise never
        # open one for a SELECT.
        try:
            conn = await aiosqlite.connect(
                uri, uri=True, isolation_level=None, timeout=self._connect_timeout_s
            )
        except sqlite3.Error as exc:
            raise self._origin.error("cannot open", str(exc), f"check {self._path}") from exc

        self._conn = conn
        await self._check_readable()
        logger.debug("opened %s", self._path)

    async def _check_readable(self) -> None:
        # Opening is lazy: a file that is not a database fails only on the first read.
        assert self._conn is not None
        try:
            await self._conn.execute("PRAGMA schema_version")
        except sqlite3.Error as exc:
            await self.close()
            raise self._origin.error(
                "cannot read", str(exc), f"is {self._path} a SQLite database?"
            ) from exc

    @asynccontextmanager
    async def read(self, sql: str, chunk_rows: int) -> AsyncIterator[SqliteResult]:
        """Run `sql` in one read transaction and yield its result, to be read in chunks."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1 (got {chunk_rows})")
        async with self._snapshot() as conn:
            columns, cursor = await self._execute(conn, sql)
            yield SqliteResult(columns, cursor, chunk_rows, self._origin)

    @asynccontextmanager
    async def read_buckets(
        self, sql: str, key: list[str] | None
    ) -> AsyncIterator[SqliteBucketRead]:
        """Open a read transaction in which `sql`'s rows are hashed and summed by buckets of
        keys as they are read (see sqlite_buckets.py)."""
        async with self._snapshot() as conn:
            columns, cursor = await self._execute(conn, sql)
            yield SqliteBucketRead(conn, sql, columns, key, self._origin, cursor)

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        # Every statement between BEGIN and the rollback reads one snapshot of the file.
        if self._reading:
            raise RuntimeError("this source is already reading; finish one read before another")
        await self.open()
        assert self._conn is not None
        conn = self._conn
        self._reading = True
        try:
            try:
                await conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise self._origin.query_failed(str(exc)) from exc
            yield conn
        finally:
            self._reading = False
            await self._end(conn)

    async def _execute(
        self, conn: aiosqlite.Connection, sql: str
    ) -> tuple[list[Column], aiosqlite.Cursor]:
        try:
            types = await _declared_types(conn, sql)
            cursor = await conn.execute(sql)
        except sqlite3.Error as exc:
            raise self._origin.query_failed(str(exc)) from exc
        names = [item[0] for item in cursor.description or ()]
        if len(types) != len(names):
            types = [""] * len(names)
        return [Column(name, kind) for name, kind in zip(names, types, strict=True)], cursor

    async def _end(self, conn: aiosqlite.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            await conn.execute("ROLLBACK")
        except (sqlite3.Error, ValueError) as exc:
            logger.debug("closing %s after a failed rollback: %s", self._path, exc)
            await self.close()

    async def close(self) -> None:
        """Close the file; never raises."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.close()
        except sqlite3.Error as exc:
            logger.debug("closing %s failed: %s", self._path, exc)

    async def __aenter__(self) -> SqliteSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _declared_types(conn: aiosqlite.Connection, sql: str) -> list[str]:
    """Return the declared type of each result column, "" for expressions.

    sqlite3 does not expose sqlite3_column_decltype, but a view carries its columns' declared
    types, so a temporary view over the SELECT shows them without running it. Any failure
    here yields no types; the SELECT itself then reports the problem.
    """
    body = sql.strip().rstrip(";")
    try:
        await conn.execute(f"CREATE TEMP VIEW {_PROBE_VIEW} AS {body}")
        try:
            cursor = await conn.execute(f"PRAGMA temp.table_info({_PROBE_VIEW})")
            rows = await cursor.fetchall()
            await cursor.close()
        finally:
            await conn.execute(f"DROP VIEW IF EXISTS temp.{_PROBE_VIEW}")
    except (sqlite3.Error, ValueError) as exc:
        logger.debug("no declared types for the SELECT: %s", exc)
        return []
    return [str(row[2]).lower() for row in rows]


class SqliteResult:
    """The rows of one SELECT, fetched chunk by chunk from a SQLite cursor."""

    def __init__(
        self, columns: list[Column], cursor: aiosqlite.Cursor, chunk_rows: int, origin: Origin
    ) -> None:
        self._columns = columns
        self._cursor = cursor
        self._chunk_rows = chunk_rows
        self._origin = origin

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def chunks(self) -> AsyncIterator[list[Row]]:
        """Yield lists of at most chunk_rows rows; end only when SQLite said it is done."""
        while True:
            try:
                rows = list(await self._cursor.fetchmany(self._chunk_rows))
            except (sqlite3.Error, ValueError) as exc:
                raise self._origin.query_failed(str(exc)) from exc
            if rows:
                yield [tuple(row) for row in rows]
            if len(rows) < self._chunk_rows:
                return
