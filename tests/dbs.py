"""Source databases for the end-to-end tests: one small driver-level helper per database.

Each `SourceDb` runs plain SQL through the database's ordinary driver (not through our
extractors) and reads a SELECT back encoded with the canonical codec, so the store's copy can
be compared with the source value by value.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from manta_async.diff import codec
from manta_async.extract import pgtypes


class SourceDb(Protocol):
    kind: str
    url: str

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None: ...

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None: ...

    def encoded_rows(self, sql: str) -> list[bytes]: ...

    def placeholder(self) -> str: ...


class SqliteDb:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}" if not path.is_absolute() else f"sqlite:///{path}"
        sqlite3.connect(path).close()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with sqlite3.connect(self.path) as conn:
            conn.executemany(sql, rows)

    def encoded_rows(self, sql: str) -> list[bytes]:
        with sqlite3.connect(self.path) as conn:
            return sorted(codec.dumps(codec.encode_row(r)) for r in conn.execute(sql))

    def placeholder(self) -> str:
        return "?"


class PostgresDb:
    kind = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    def _run(self, fn: Any) -> Any:
        import asyncpg

        async def go() -> Any:
            conn = await asyncpg.connect(self.url)
            try:
                return await fn(conn)
            finally:
                await conn.close()

        return asyncio.run(go()) if not _loop_running() else _in_thread(go)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._run(lambda conn: conn.execute(sql, *params))

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self._run(lambda conn: conn.executemany(sql, rows))

    def encoded_rows(self, sql: str) -> list[bytes]:
        async def fetch(conn: Any) -> list[bytes]:
            # Read as the extractor reads the types asyncpg would change (see pgtypes.py).
            await conn.execute("SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'")
            await pgtypes.use_exact_codecs(conn)
            rows = await conn.fetch(sql)
            return sorted(codec.dumps(codec.encode_row(tuple(r))) for r in rows)

        result: list[bytes] = self._run(fetch)
        return result

    def placeholder(self) -> str:
        return "$"


class MysqlDb:
    kind = "mariadb"

    def __init__(self, url: str) -> None:
        self.url = url

    def _connect(self) -> Any:
        import pymysql

        return pymysql.connect(
            host="127.0.0.1", port=3306, user="root", password="", database="manta_test",
            charset="utf8mb4", autocommit=True, init_command="SET time_zone = '+00:00'",
        )  # fmt: skip

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params or None)
        finally:
            conn.close()

    def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.executemany(sql, rows)
        finally:
            conn.close()

    def encoded_rows(self, sql: str) -> list[bytes]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                tags = [_DATE_TAGS.get(column[1]) for column in cur.description or ()]
                rows = [_plain(row, tags) for row in cur.fetchall()]
                return sorted(codec.dumps(codec.encode_row(row)) for row in rows)
        finally:
            conn.close()

    def placeholder(self) -> str:
        return "%s"


# PyMySQL returns a zero date as the server's text; the extractor marks it with its tag. The
# keys are the protocol's type codes of DATE, NEWDATE, TIMESTAMP and DATETIME.
_DATE_TAGS = {10: "$date", 14: "$date", 7: "$ts", 12: "$ts"}


def _plain(row: tuple[Any, ...], tags: list[str | None]) -> tuple[Any, ...]:
    return tuple(
        bytes(v)
        if isinstance(v, bytearray)
        else codec.Special(tag, v)
        if tag is not None and isinstance(v, str)
        else v
        for v, tag in zip(row, tags, strict=True)
    )


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(factory: Any) -> Any:
    # Called from inside a running event loop (an async test): run the coroutine on a
    # private loop in a worker thread, blocking, as a plain driver call would.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def decode_lines(body: bytes) -> Iterator[list[Any]]:
    for line in body.splitlines():
        if line:
            yield orjson.loads(line)
