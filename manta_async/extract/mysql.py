"""The MySQL and MariaDB extractor, on aiomysql.

Each read runs in a read-only transaction opened WITH CONSISTENT SNAPSHOT and streams its rows
through an unbuffered server-side cursor (SSCursor), so memory stays bounded whatever the
table's size. The session speaks utf8mb4 and its time_zone is UTC.

aiomysql's SSCursor.fetchmany answers [] both at the end of the result and when asked again
after an error packet, so a short chunk is trusted only once the result has seen the server's
end-of-rows packet (see `_ended`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiomysql
import pymysql
from pymysql.constants import FIELD_TYPE

from manta_async.config import SourceConfig
from manta_async.diff import codec
from manta_async.errors import SourceError
from manta_async.extract import Origin, ServerUrl
from manta_async.extract.base import Column, Row
from manta_async.extract.mysql_buckets import (
    GROUP_BY_BYTES,
    HashSql,
    MysqlBucketRead,
    has_crc32c,
)

logger = logging.getLogger(__name__)

_BINARY_CHARSET = 63
_TYPE_NAMES = {
    FIELD_TYPE.DECIMAL: "decimal",
    FIELD_TYPE.NEWDECIMAL: "decimal",
    FIELD_TYPE.TINY: "tinyint",
    FIELD_TYPE.SHORT: "smallint",
    FIELD_TYPE.INT24: "mediumint",
    FIELD_TYPE.LONG: "int",
    FIELD_TYPE.LONGLONG: "bigint",
    FIELD_TYPE.FLOAT: "float",
    FIELD_TYPE.DOUBLE: "double",
    FIELD_TYPE.NULL: "null",
    FIELD_TYPE.TIMESTAMP: "timestamp",
    FIELD_TYPE.DATE: "date",
    FIELD_TYPE.NEWDATE: "date",
    FIELD_TYPE.TIME: "time",
    FIELD_TYPE.DATETIME: "datetime",
    FIELD_TYPE.YEAR: "year",
    FIELD_TYPE.BIT: "bit",
    FIELD_TYPE.JSON: "json",
    FIELD_TYPE.ENUM: "enum",
    FIELD_TYPE.SET: "set",
    FIELD_TYPE.TINY_BLOB: "tinyblob",
    FIELD_TYPE.MEDIUM_BLOB: "mediumblob",
    FIELD_TYPE.LONG_BLOB: "longblob",
    FIELD_TYPE.BLOB: "blob",
    FIELD_TYPE.VARCHAR: "varchar",
    FIELD_TYPE.VAR_STRING: "varchar",
    FIELD_TYPE.STRING: "char",
    FIELD_TYPE.GEOMETRY: "geometry",
}
# The protocol reports text and binary strings with the same codes; the charset tells them
# apart (63 is "binary").
_BINARY_NAMES = {"blob": "blob", "varchar": "varbinary", "char": "binary"}
_TEXT_NAMES = {"blob": "text", "tinyblob": "tinytext", "mediumblob": "mediumtext"}
_TEXT_NAMES |= {"longblob": "longtext"}
_BYTES = {"blob", "tinyblob", "mediumblob", "longblob", "varbinary", "binary", "bit", "geometry"}

# Server and client error codes.
_ACCESS_DENIED = (1044, 1045, 1698)
_UNKNOWN_DATABASE = 1049
_CANNOT_CONNECT = (2002, 2003, 2005)
_LOST = (2006, 2013, 2055, 1053, 1927)


async def connect(source: SourceConfig, name: str | None = None) -> MysqlSource:
    """Open a connection to the MySQL or MariaDB database `source.url` names."""
    origin = Origin(source.url, name)
    url = ServerUrl.parse(source.url, origin)
    my_source = MysqlSource(url, origin, source.connect_timeout_s)
    await my_source.open()
    return my_source


def _code(exc: pymysql.err.MySQLError) -> int | None:
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else None


def _message(exc: BaseException) -> str:
    # pymysql errors carry (code, text); the text is what a user can act on.
    args: tuple[object, ...] = getattr(exc, "args", ())
    text = str(args[1]) if len(args) == 2 else str(exc)
    cause = exc.__cause__
    if cause is not None and str(cause):
        text = f"{text} ({cause})"
    return text


def _connect_error(exc: pymysql.err.MySQLError, url: ServerUrl, origin: Origin) -> SourceError:
    """Return the SourceError a user can act on for a failed connection attempt."""
    code = _code(exc)
    if code in _ACCESS_DENIED:
        return origin.refused(url.user or "", _message(exc))
    if code == _UNKNOWN_DATABASE:
        return origin.unknown_database(url.database or "", _message(exc))
    if code in _CANNOT_CONNECT or code in _LOST:
        return origin.unreachable(_message(exc))
    return origin.error("cannot open", _message(exc), f"check url in {origin.section}")


def _read_error(exc: pymysql.err.MySQLError, origin: Origin) -> SourceError:
    if isinstance(exc, pymysql.err.OperationalError) and _code(exc) in _LOST:
        return origin.lost(_message(exc))
    if isinstance(exc, pymysql.err.InterfaceError):
        return origin.lost(_message(exc))
    return origin.query_failed(_message(exc))


class MysqlSource:
    """One connection to a MySQL or MariaDB database; reads run one after another."""

    def __init__(self, url: ServerUrl, origin: Origin, connect_timeout_s: float) -> None:
        self._url = url
        self._origin = origin
        self._connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._reading = False

    async def open(self) -> None:
        """Connect, unless connected already; raise SourceError if that fails."""
        if self._conn is not None and not self._conn.closed:
            return

        options: dict[str, Any] = {"host": self._url.host, "port": self._url.port}
        options = {key: value for key, value in options.items() if value is not None}
        try:
            # aiomysql's own connect_timeout covers only the TCP connect, not the handshake.
            async with asyncio.timeout(self._connect_timeout_s):
                self._conn = await aiomysql.connect(
                    **options,
                    user=self._url.user,
                    password=self._url.password,
                    db=self._url.database,
                    charset="utf8mb4",
                    init_command="SET time_zone = '+00:00'",
                    connect_timeout=self._connect_timeout_s,
                    cursorclass=aiomysql.SSCursor,
                    program_name="manta-async",
                )
        except TimeoutError as exc:
            raise self._origin.timed_out(self._connect_timeout_s) from exc
        except pymysql.err.MySQLError as exc:
            raise _connect_error(exc, self._url, self._origin) from exc

        logger.debug("connected to %s", self._origin.masked)

    @asynccontextmanager
    async def read(self, sql: str, chunk_rows: int) -> AsyncIterator[MysqlResult]:
        """Run `sql` in a read-only snapshot and yield its result, to be read in chunks."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1 (got {chunk_rows})")
        if self._reading:
            raise RuntimeError("this source is already reading; finish one read before another")
        await self.open()
        conn = self._conn
        cursor = await conn.cursor()

        self._reading = True
        result: MysqlResult | None = None
        try:
            result = await self._start(cursor, sql, chunk_rows)
            yield result
        finally:
            self._reading = False
            await self._end(conn, cursor, finished=result is not None and result.finished)

    async def _start(self, cursor: Any, sql: str, chunk_rows: int) -> MysqlResult:
        try:
            await cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            await cursor.execute(sql)
        except pymysql.err.MySQLError as exc:
            raise _read_error(exc, self._origin) from exc
        return MysqlResult(cursor, chunk_rows, self._origin)

    @asynccontextmanager
    async def read_buckets(self, sql: str, key: list[str] | None) -> AsyncIterator[MysqlBucketRead]:
        """Open a read-only snapshot in which the server sums `sql`'s rows by buckets."""
        if self._reading:
            raise RuntimeError("this source is already reading; finish one read before another")
        await self.open()
        conn = self._conn
        cursor = await conn.cursor()

        async def execute(statement: str) -> None:
            try:
                await cursor.execute(statement)
            except pymysql.err.MySQLError as exc:
                raise _read_error(exc, self._origin) from exc

        async def run(statement: str, chunk_rows: int) -> MysqlResult:
            await execute(statement)
            return MysqlResult(cursor, chunk_rows, self._origin)

        self._reading = True
        read: MysqlBucketRead | None = None
        try:
            # The GROUP BY of a large table's buckets spills to disk past the default 16 MB.
            await execute(f"SET SESSION tmp_table_size = {GROUP_BY_BYTES}, "
                          f"max_heap_table_size = {GROUP_BY_BYTES}")  # fmt: skip
            await execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            probe = HashSql(sql, [], None, crc32c=False)
            shape = await run(f"SELECT * FROM {probe.source} LIMIT 0", 1)
            async for _ in shape.chunks():
                pass
            crc32c = has_crc32c(conn.get_server_info())
            hash_sql = HashSql(sql, shape.columns, key, crc32c)
            read = MysqlBucketRead(run, hash_sql, shape.columns)
            yield read
        finally:
            self._reading = False
            await self._end(conn, cursor, finished=read is not None and read.finished)

    async def _end(self, conn: Any, cursor: Any, finished: bool) -> None:
        # An unfinished unbuffered result can only be skipped by reading it to its end, which
        # may be millions of rows; dropping the connection is cheaper, and the next read
        # reconnects. After a complete read the connection is reused.
        if conn.closed:
            return
        if not finished:
            logger.debug("closing %s after an unfinished read", self._origin.masked)
            conn.close()
            return
        try:
            await cursor.close()
            await conn.rollback()
        except pymysql.err.MySQLError as exc:
            logger.debug("dropping the connection to %s: %s", self._origin.masked, exc)
            conn.close()

    async def close(self) -> None:
        """Close the connection; never raises."""
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            return
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await conn.ensure_closed()
        except (OSError, TimeoutError):
            conn.close()

    async def __aenter__(self) -> MysqlSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MysqlResult:
    """The rows of one SELECT, streamed by an unbuffered cursor."""

    def __init__(self, cursor: Any, chunk_rows: int, origin: Origin) -> None:
        self._cursor = cursor
        self._chunk_rows = chunk_rows
        self._origin = origin
        fields = cursor._result.fields if cursor._result is not None else []
        self._columns = [_column(field) for field in fields]
        # Only the columns whose values may need converting pay for it (see _CONVERTS).
        self._converts = [
            (i, _CONVERTS[column.type])
            for i, column in enumerate(self._columns)
            if column.type in _CONVERTS
        ]
        self.finished = False

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def chunks(self) -> AsyncIterator[list[Row]]:
        """Yield lists of at most chunk_rows rows; end only when the server said it is done."""
        while True:
            rows = await self._fetch()
            if rows:
                yield [self._row(row) for row in rows]
            if len(rows) < self._chunk_rows:
                self._check_ended()
                self.finished = True
                return

    async def _fetch(self) -> list[tuple[Any, ...]]:
        try:
            rows: list[tuple[Any, ...]] = await self._cursor.fetchmany(self._chunk_rows)
        except pymysql.err.MySQLError as exc:
            raise _read_error(exc, self._origin) from exc
        except (OSError, AttributeError) as exc:
            # aiomysql raises AttributeError when asked to read from a connection it has
            # already closed after an error.
            raise self._origin.lost(repr(exc)) from exc
        return rows

    def _check_ended(self) -> None:
        # aiomysql clears the result's connection only when it reads the end-of-rows packet;
        # anything else means the rows stopped early without an exception.
        result = self._cursor._result
        if result is None or result.unbuffered_active or result.connection is not None:
            raise self._origin.lost("the result ended before the server's end-of-rows packet")

    def _row(self, row: tuple[Any, ...]) -> Row:
        if not self._converts:
            return row
        values = list(row)
        for i, convert in self._converts:
            values[i] = convert(values[i])
        return tuple(values)


def _bytes(value: Any) -> Any:
    return bytes(value) if isinstance(value, bytearray) else value


def _special(tag: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return codec.Special(tag, value) if isinstance(value, str) else value

    return convert


# Binary strings may come back as bytearray. A zero or partial date ('0000-00-00',
# '2016-00-00 10:00:00'), which a relaxed sql_mode lets in, has no Python value: PyMySQL
# returns the server's text, which travels as that text under the date's own tag.
_CONVERTS: dict[str, Callable[[Any], Any]] = {name: _bytes for name in _BYTES}
_CONVERTS |= {"date": _special("$date"), "datetime": _special("$ts")}
_CONVERTS |= {"timestamp": _special("$ts")}


def _column(field: Any) -> Column:
    name = _TYPE_NAMES.get(field.type_code, f"type{field.type_code}")
    if field.charsetnr == _BINARY_CHARSET:
        name = _BINARY_NAMES.get(name, name)
    else:
        name = _TEXT_NAMES.get(name, name)
    return Column(field.name, name)
