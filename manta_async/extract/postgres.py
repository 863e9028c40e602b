"""The PostgreSQL extractor, on asyncpg.

Each read runs in a read-only REPEATABLE READ transaction and pulls its rows through a
server-side cursor, `chunk_rows` rows per round trip, so memory stays bounded whatever the
table's size. The session's TimeZone is UTC so timestamptz values come back in UTC. The few
types whose asyncpg value would lose what the database holds are decoded otherwise (see
pgtypes.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from manta_async.config import SourceConfig
from manta_async.errors import SourceError
from manta_async.extract import Origin, ServerUrl, pgtypes
from manta_async.extract.base import Column, Row
from manta_async.extract.postgres_buckets import SETTINGS, HashSql, PostgresBucketRead

logger = logging.getLogger(__name__)

# Errors that mean the connection itself is gone, as opposed to the statement failing. When
# the server ends the session between two fetches, asyncpg may report InternalClientError
# ("another operation is in progress") instead of a connection error: its protocol is left
# consuming the server's unsolicited FATAL message.
_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    OSError,
)


async def connect(source: SourceConfig, name: str | None = None) -> PostgresSource:
    """Open a connection to the PostgreSQL database `source.url` names."""
    origin = Origin(source.url, name)
    url = ServerUrl.parse(source.url, origin)
    pg_source = PostgresSource(url, origin, source.connect_timeout_s)
    await pg_source.open()
    return pg_source


def _convert_error(exc: BaseException, url: ServerUrl, origin: Origin) -> SourceError:
    """Return the SourceError a user can act on for a failed connection attempt."""
    detail = str(exc)
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return origin.refused(url.user or "", detail)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return origin.unknown_database(url.database or "", detail)
    if isinstance(exc, OSError):
        return origin.unreachable(detail or type(exc).__name__)
    return origin.error("cannot open", detail, f"check url in {origin.section}")


_SETTINGS = {"TimeZone": "UTC", "IntervalStyle": "postgres", "application_name": "manta-async"}


class PostgresSource:
    """One connection to a PostgreSQL database; reads run one after another."""

    def __init__(self, url: ServerUrl, origin: Origin, connect_timeout_s: float) -> None:
        self._url = url
        self._origin = origin
        self._connect_timeout_s = connect_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._reading = False

    async def open(self) -> None:
        """Connect, unless connected already; raise SourceError if that fails."""
        if self._conn is not None and not self._conn.is_closed():
            return

        try:
            conn = await asyncpg.connect(
                host=self._url.host,
                port=self._url.port,
                user=self._url.user,
                password=self._url.password or None,
                database=self._url.database,
                timeout=self._connect_timeout_s,
                server_settings=_SETTINGS,
            )
        except TimeoutError as exc:
            raise self._origin.timed_out(self._connect_timeout_s) from exc
        except (*_LOST, asyncpg.PostgresError) as exc:
            raise _convert_error(exc, self._url, self._origin) from exc

        try:
            await pgtypes.use_exact_codecs(conn)
        except (*_LOST, asyncpg.PostgresError) as exc:
            conn.terminate()
            raise _convert_error(exc, self._url, self._origin) from exc
        self._conn = conn
        logger.debug("connected to %s", self._origin.masked)

    @asynccontextmanager
    async def read(self, sql: str, chunk_rows: int) -> AsyncIterator[PostgresResult]:
        """Run `sql` in a read-only snapshot and yield its result, to be read in chunks."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1 (got {chunk_rows})")
        async with self._snapshot() as (conn, transaction):
            yield await self._start(conn, transaction, sql, chunk_rows)

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[tuple[asyncpg.Connection, Any]]:
        # One read at a time, each in its own read-only REPEATABLE READ transaction.
        if self._reading:
            raise RuntimeError("this source is already reading; finish one read before another")
        await self.open()
        assert self._conn is not None
        conn = self._conn
        transaction = conn.transaction(isolation="repeatable_read", readonly=True)

        self._reading = True
        try:
            yield conn, transaction
        finally:
            self._reading = False
            await self._end(conn, transaction)

    async def _start(
        self, conn: asyncpg.Connection, transaction: Any, sql: str, chunk_rows: int
    ) -> PostgresResult:
        try:
            await transaction.start()
            statement = await conn.prepare(sql)
            attributes = statement.get_attributes()
            cursor = await statement.cursor()
        except _LOST as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc
        return PostgresResult(attributes, cursor, chunk_rows, self._origin)

    @asynccontextmanager
    async def read_buckets(
        self, sql: str, key: list[str] | None
    ) -> AsyncIterator[PostgresBucketRead]:
        """Open a read-only snapshot in which the server sums `sql`'s rows by buckets."""
        async with self._snapshot() as (conn, transaction):
            yield await self._start_buckets(conn, transaction, sql, key)

    async def _start_buckets(
        self, conn: asyncpg.Connection, transaction: Any, sql: str, key: list[str] | None
    ) -> PostgresBucketRead:
        hash_sql = HashSql(sql, [], None)
        try:
            await transaction.start()
            # The text of every value is hashed, so its form is pinned for this transaction.
            await conn.execute("; ".join(SETTINGS))
            statement = await conn.prepare(f"SELECT * FROM {hash_sql.source}")
            attributes = statement.get_attributes()
        except _LOST as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc
        columns = [Column(item.name, item.type.name) for item in attributes]
        return PostgresBucketRead(
            conn,
            HashSql(sql, attributes, key),
            columns,
            self._origin,
            _LOST,
            _bucket_row(attributes),
        )

    async def _end(self, conn: asyncpg.Connection, transaction: Any) -> None:
        # Rolling back a read-only transaction only releases its snapshot and cursor. When
        # that fails the connection is in an unknown state, so drop it; the next read
        # reconnects.
        if conn.is_closed():
            return
        try:
            await transaction.rollback()
        except (*_LOST, asyncpg.PostgresError) as exc:
            logger.debug("dropping the connection to %s: %s", self._origin.masked, exc)
            conn.terminate()

    async def close(self) -> None:
        """Close the connection; never raises."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=self._connect_timeout_s)
        except (*_LOST, asyncpg.PostgresError, TimeoutError):
            conn.terminate()

    async def __aenter__(self) -> PostgresSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class PostgresResult:
    """The rows of one SELECT, fetched through a server-side cursor."""

    def __init__(self, attributes: Any, cursor: Any, chunk_rows: int, origin: Origin) -> None:
        self._columns = [Column(item.name, item.type.name) for item in attributes]
        self._cursor = cursor
        self._chunk_rows = chunk_rows
        self._origin = origin
        # Composite values arrive as asyncpg Records, inside arrays too; only such columns
        # pay for the conversion to tuples.
        self._nested = [
            i for i, item in enumerate(attributes) if item.type.kind in ("composite", "array")
        ]

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def chunks(self) -> AsyncIterator[list[Row]]:
        """Yield lists of at most chunk_rows rows; end only when the server said it is done."""
        while True:
            records = await self._fetch()
            if records:
                yield [self._row(record) for record in records]
            # The server returns fewer rows than asked for only when the portal is complete;
            # a lost connection raises instead.
            if len(records) < self._chunk_rows:
                return

    async def _fetch(self) -> list[asyncpg.Record]:
        try:
            records: list[asyncpg.Record] = await self._cursor.fetch(self._chunk_rows)
        except _LOST as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc
        except TimeoutError as exc:
            raise self._origin.lost("timed out") from exc
        return records

    def _row(self, record: asyncpg.Record) -> Row:
        row = tuple(record)
        if not self._nested:
            return row
        values = list(row)
        for i in self._nested:
            values[i] = _plain(values[i])
        return tuple(values)


def _plain(value: Any) -> Any:
    """Return `value` with asyncpg Records (composite types) turned into tuples."""
    if isinstance(value, asyncpg.Record):
        return tuple(_plain(item) for item in value.values())
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _bucket_row(attributes: Any) -> Callable[[asyncpg.Record], Row]:
    """Return the conversion of a bucket read's record: its key hash and row hash, then the
    row's values converted as a plain read converts them."""
    nested = [
        i + 2 for i, item in enumerate(attributes) if item.type.kind in ("composite", "array")
    ]
    if not nested:
        return tuple

    def convert(record: asyncpg.Record) -> Row:
        values = list(record)
        for i in nested:
            values[i] = _plain(values[i])
        return tuple(values)

    return convert
