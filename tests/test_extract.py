"""The extractor contract, run against SQLite and against real PostgreSQL and MariaDB servers.

The servers are expected at 127.0.0.1 (PostgreSQL 5432, user postgres, trust auth; MariaDB
3306, user root, no password; database `test` on both). When one does not answer, its cases
are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomysql
import asyncpg
import pytest

from manta_async.config import SourceConfig
from manta_async.errors import SourceError
from manta_async.extract import Origin, ServerUrl, Source, connect, mask_url

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql://root@127.0.0.1:3306/test"
BIG_ROWS = 2_000_000
"""Rows in the results the kill tests cut off: far more than socket buffers hold."""


@dataclass
class Backend:
    """One database the contract runs against: how to reach it and how to set it up."""

    name: str
    url: str
    base_dir: Path
    types: dict[str, str]
    """DDL type for each contract column kind."""
    reported: dict[str, str]
    """The column type the extractor reports for each contract column kind."""
    execute: Callable[[str], Awaitable[None]]
    insert: Callable[[str, Sequence[tuple[Any, ...]]], Awaitable[None]]
    tables: list[str] = field(default_factory=list)

    async def create(self, columns: dict[str, str]) -> str:
        """Create a table with a unique name; `columns` maps names to contract kinds."""
        table = f"manta_extract_{uuid.uuid4().hex[:12]}"
        ddl = ", ".join(f"{name} {self.types[kind]}" for name, kind in columns.items())
        await self.execute(f"CREATE TABLE {table} ({ddl})")
        self.tables.append(table)
        return table

    async def open(self, **options: Any) -> Source:
        return await connect(SourceConfig(url=self.url, **options), self.base_dir, self.name)


async def _sqlite_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    db = sqlite3.connect(tmp_path / "source.db")

    async def execute(sql: str) -> None:
        db.execute(sql)
        db.commit()

    async def insert(table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        marks = ", ".join("?" * len(rows[0]))
        db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        db.commit()

    yield Backend(
        "sqlite",
        "sqlite:///source.db",
        tmp_path,
        {"int": "INTEGER", "dec": "NUMERIC(12,2)", "text": "TEXT", "bytes": "BLOB"},
        {"int": "integer", "dec": "numeric(12,2)", "text": "text", "bytes": "blob"},
        execute,
        insert,
    )
    db.close()


async def _postgres_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    try:
        admin = await asyncpg.connect(PG_URL, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_URL}: {exc}")

    async def execute(sql: str) -> None:
        await admin.execute(sql)

    async def insert(table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        marks = ", ".join(f"${i + 1}" for i in range(len(rows[0])))
        await admin.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    backend = Backend(
        "postgres",
        PG_URL,
        tmp_path,
        {"int": "integer", "dec": "numeric(12,2)", "text": "text", "bytes": "bytea"},
        {"int": "int4", "dec": "numeric", "text": "text", "bytes": "bytea"},
        execute,
        insert,
    )
    yield backend
    for table in backend.tables:
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
    await admin.close()


async def _mariadb_admin() -> Any:
    try:
        return await aiomysql.connect(
            host="127.0.0.1", port=3306, user="root", db="test", autocommit=True,
            charset="utf8mb4", connect_timeout=5,
        )  # fmt: skip
    except Exception as exc:  # aiomysql wraps every connect failure differently
        pytest.skip(f"MariaDB is not reachable at {MARIADB_URL}: {exc}")


async def _mariadb_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    admin = await _mariadb_admin()

    async def execute(sql: str) -> None:
        async with admin.cursor() as cursor:
            await cursor.execute(sql)

    def literal(value: Any) -> str:
        # aiomysql 0.3 cannot escape bytes with PyMySQL 1.2 (it imports a name PyMySQL
        # retired), so bytes are written as hex literals.
        return f"X'{value.hex()}'" if isinstance(value, bytes) else str(admin.escape(value))

    async def insert(table: str, rows: Sequence[tuple[Any, ...]]) -> None:
        for start in range(0, len(rows), 1000):
            values = ", ".join(
                "(" + ", ".join(literal(value) for value in row) + ")"
                for row in rows[start : start + 1000]
            )
            await execute(f"INSERT INTO {table} VALUES {values}")

    backend = Backend(
        "mariadb",
        MARIADB_URL,
        tmp_path,
        {
            "int": "int",
            "dec": "decimal(12,2)",
            "text": "text CHARACTER SET utf8mb4",
            "bytes": "longblob",
        },
        {"int": "int", "dec": "decimal", "text": "text", "bytes": "blob"},
        execute,
        insert,
    )
    yield backend
    for table in backend.tables:
        await execute(f"DROP TABLE IF EXISTS {table}")
    admin.close()


_BACKENDS = {
    "sqlite": _sqlite_backend,
    "postgres": _postgres_backend,
    "mariadb": _mariadb_backend,
}


@pytest.fixture(params=list(_BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for value in _BACKENDS[request.param](tmp_path):
        yield value


@pytest.fixture(params=["postgres", "mariadb"])
async def server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async for value in _BACKENDS[request.param](tmp_path):
        yield value


async def read_all(
    source: Source, sql: str, chunk_rows: int
) -> tuple[list[str], list[str], list[list[tuple[Any, ...]]]]:
    async with source.read(sql, chunk_rows) as result:
        chunks = [chunk async for chunk in result.chunks()]
        names = [column.name for column in result.columns]
        types = [column.type for column in result.columns]
    return names, types, chunks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the contract -----------------------------------------------------------------------------


async def test_streams_all_rows_in_chunks_of_chunk_rows(backend: Backend) -> None:
    table = await backend.create({"id": "int", "note": "text"})
    await backend.insert(table, [(i, f"row {i}") for i in range(12_345)])

    async with await backend.open() as source:
        names, types, chunks = await read_all(
            source, f"SELECT id, note FROM {table} ORDER BY id", 1000
        )

    assert [len(chunk) for chunk in chunks] == [1000] * 12 + [345]
    assert [row for chunk in chunks for row in chunk] == [(i, f"row {i}") for i in range(12_345)]
    assert all(type(row) is tuple for chunk in chunks for row in chunk)
    assert names == ["id", "note"]
    assert types == [backend.reported["int"], backend.reported["text"]]


async def test_a_result_of_whole_chunks_has_no_empty_last_chunk(backend: Backend) -> None:
    table = await backend.create({"id": "int"})
    await backend.insert(table, [(i,) for i in range(30)])

    async with await backend.open() as source:
        _, _, chunks = await read_all(source, f"SELECT id FROM {table}", 10)

    assert [len(chunk) for chunk in chunks] == [10, 10, 10]


async def test_an_empty_result_has_columns_and_no_chunks(backend: Backend) -> None:
    table = await backend.create({"id": "int", "note": "text"})

    async with await backend.open() as source:
        names, types, chunks = await read_all(source, f"SELECT id, note FROM {table}", 100)

    assert chunks == []
    assert names == ["id", "note"]
    assert types == [backend.reported["int"], backend.reported["text"]]


async def test_nulls_are_none(backend: Backend) -> None:
    table = await backend.create({"id": "int", "amount": "dec", "note": "text", "data": "bytes"})
    await backend.insert(table, [(1, None, None, None)])

    async with await backend.open() as source:
        _, types, chunks = await read_all(source, f"SELECT * FROM {table}", 10)

    assert chunks == [[(1, None, None, None)]]
    assert types == [backend.reported[kind] for kind in ("int", "dec", "text", "bytes")]


async def test_bytes_stay_bytes(backend: Backend) -> None:
    table = await backend.create({"data": "bytes"})
    value = bytes(range(256))
    await backend.insert(table, [(value,)])

    async with await backend.open() as source:
        _, _, chunks = await read_all(source, f"SELECT data FROM {table}", 10)

    assert chunks == [[(value,)]]
    assert type(chunks[0][0][0]) is bytes


async def test_unicode_and_emoji_text_is_intact(backend: Backend) -> None:
    table = await backend.create({"note": "text"})
    text = "naïve façade ☃ 😀 𝄞 中文 \u200d"
    await backend.insert(table, [(text,)])

    async with await backend.open() as source:
        _, _, chunks = await read_all(source, f"SELECT note FROM {table}", 10)

    assert chunks == [[(text,)]]


async def test_decimal_stays_decimal_with_its_scale(server: Backend) -> None:
    table = await server.create({"amount": "dec"})
    await server.insert(table, [(Decimal("1.10"),), (Decimal("-12345.67"),)])

    async with await server.open() as source:
        _, _, chunks = await read_all(source, f"SELECT amount FROM {table} ORDER BY amount", 10)

    assert chunks == [[(Decimal("-12345.67"),), (Decimal("1.10"),)]]
    assert str(chunks[0][1][0]) == "1.10"


async def test_sql_error_raises_source_error_with_the_database_message(backend: Backend) -> None:
    async with await backend.open() as source:
        with pytest.raises(SourceError) as caught:
            await read_all(source, "SELECT * FROM manta_no_such_table_xyz", 10)

    message = str(caught.value).lower()
    assert "manta_no_such_table_xyz" in message
    assert any(words in message for words in ("does not exist", "doesn't exist", "no such table"))
    assert caught.value.__cause__ is not None


async def test_syntax_error_raises_source_error(backend: Backend) -> None:
    async with await backend.open() as source:
        with pytest.raises(SourceError, match="(?i)syntax"):
            await read_all(source, "SELEC 1", 10)


async def test_source_stays_usable_after_a_failed_read(backend: Backend) -> None:
    async with await backend.open() as source:
        with pytest.raises(SourceError):
            await read_all(source, "SELECT * FROM manta_no_such_table_xyz", 10)
        _, _, chunks = await read_all(source, "SELECT 1", 10)

    assert chunks == [[(1,)]]


async def test_leaving_a_read_early_keeps_the_source_usable(backend: Backend) -> None:
    table = await backend.create({"id": "int"})
    await backend.insert(table, [(i,) for i in range(5000)])

    async with await backend.open() as source:
        async with source.read(f"SELECT id FROM {table} ORDER BY id", 100) as result:
            async for chunk in result.chunks():
                assert len(chunk) == 100
                break
        _, _, chunks = await read_all(source, f"SELECT count(*) FROM {table}", 10)

    assert chunks == [[(5000,)]]


# --- servers: failures in the middle of a read ---------------------------------------------------

_SESSION_ID_SQL = {
    "postgres": f"SELECT g, pg_backend_pid() FROM generate_series(1, {BIG_ROWS}) AS g",
    "mariadb": f"SELECT seq, CONNECTION_ID() FROM seq_1_to_{BIG_ROWS}",
}
_KILL_SQL = {
    "postgres": "SELECT pg_terminate_backend({})",
    "mariadb": "KILL {}",
}


async def test_connection_killed_mid_stream_raises_source_error(server: Backend) -> None:
    seen = 0
    async with await server.open() as source:
        with pytest.raises(SourceError, match="lost the connection") as caught:
            async with source.read(_SESSION_ID_SQL[server.name], 1000) as result:
                async for chunk in result.chunks():
                    if seen == 0:
                        await server.execute(_KILL_SQL[server.name].format(chunk[0][1]))
                    seen += len(chunk)

        # The next read opens a new connection.
        _, _, chunks = await read_all(source, "SELECT 1", 10)

    assert 0 < seen < BIG_ROWS
    assert caught.value.__cause__ is not None
    assert chunks == [[(1,)]]


async def test_close_releases_the_connection_after_a_failed_read(server: Backend) -> None:
    source = await server.open()
    _, _, chunks = await read_all(source, _SESSION_ID_SQL[server.name] + " LIMIT 1", 10)
    session = chunks[0][0][1]
    with pytest.raises(SourceError):
        await read_all(source, "SELECT * FROM manta_no_such_table_xyz", 10)
    await source.close()

    assert await _session_gone(server, session)


_SESSION_COUNT_SQL = {
    "postgres": "SELECT count(*) FROM pg_stat_activity WHERE pid = {}",
    "mariadb": "SELECT count(*) FROM information_schema.PROCESSLIST WHERE id = {}",
}


async def _session_gone(server: Backend, session: int) -> bool:
    # The server notices a closed socket a moment later; give it a second.
    probe = await server.open()
    try:
        for _ in range(50):
            sql = _SESSION_COUNT_SQL[server.name].format(session)
            _, _, chunks = await read_all(probe, sql, 10)
            if chunks[0][0][0] == 0:
                return True
            await asyncio.sleep(0.02)
        return False
    finally:
        await probe.close()


async def _timeout_url(server: Backend) -> AsyncIterator[tuple[str, str]]:
    # A role with a statement_timeout stands in for a PostgreSQL server that cancels slow
    # statements; MariaDB takes the limit in the statement itself.
    if server.name == "mariadb":
        big = "SELECT a.seq FROM seq_1_to_100000 AS a, seq_1_to_1000 AS b"
        yield server.url, f"SET STATEMENT max_statement_time=0.2 FOR {big}"
        return
    role = f"manta_{uuid.uuid4().hex[:8]}"
    await server.execute(f"CREATE ROLE {role} LOGIN")
    await server.execute(f"ALTER ROLE {role} SET statement_timeout = '200ms'")
    try:
        sql = "SELECT g, pg_sleep(0.1) FROM generate_series(1, 100) AS g"
        yield f"postgresql://{role}@127.0.0.1:5432/test", sql
    finally:
        await server.execute(f"DROP ROLE {role}")


async def test_statement_timeout_mid_stream_raises_source_error(server: Backend) -> None:
    async for url, sql in _timeout_url(server):
        async with await connect(SourceConfig(url=url), server.base_dir) as source:
            with pytest.raises(SourceError, match="(?i)time"):
                await read_all(source, sql, 10)


async def test_reading_chunks_again_after_a_failure_raises_again(server: Backend) -> None:
    # aiomysql's fetchmany answers [] when asked again after an error packet; that must not
    # pass for the end of the result.
    async for url, sql in _timeout_url(server):
        async with await connect(SourceConfig(url=url), server.base_dir) as source:
            async with source.read(sql, 10) as result:
                with pytest.raises(SourceError):
                    _ = [chunk async for chunk in result.chunks()]
                with pytest.raises(SourceError):
                    _ = [chunk async for chunk in result.chunks()]


async def test_sessions_run_in_utc(server: Backend) -> None:
    sql = {"postgres": "SHOW TimeZone", "mariadb": "SELECT @@session.time_zone"}[server.name]

    async with await server.open() as source:
        _, _, chunks = await read_all(source, sql, 10)

    assert chunks[0][0][0] in ("UTC", "+00:00")


async def test_reads_are_read_only(server: Backend) -> None:
    table = await server.create({"id": "int"})

    async with await server.open() as source:
        with pytest.raises(SourceError, match="(?i)read.only"):
            await read_all(source, f"INSERT INTO {table} VALUES (1)", 10)


# --- servers: connection failures ------------------------------------------------------------


async def test_unreachable_port_raises_source_error_quickly(server: Backend) -> None:
    port = free_port()
    url = server.url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    url = url.replace("127.0.0.1:3306", f"127.0.0.1:{port}")
    started = time.monotonic()

    with pytest.raises(SourceError) as caught:
        await connect(SourceConfig(url=url, connect_timeout_s=5), server.base_dir, "shop")

    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "is the server running? check url in [sources.shop]" in message


async def test_a_server_that_never_answers_times_out_after_connect_timeout_s(
    server: Backend,
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    url = server.url.replace("127.0.0.1:5432", f"127.0.0.1:{port}")
    url = url.replace("127.0.0.1:3306", f"127.0.0.1:{port}")
    started = time.monotonic()

    try:
        with pytest.raises(SourceError, match="connect_timeout_s"):
            await connect(SourceConfig(url=url, connect_timeout_s=0.3), server.base_dir)
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()

    # Far below the 10 s default: the configured 0.3 s was honoured, with room for a busy host.
    assert time.monotonic() - started < 3


async def test_unknown_database_raises_source_error(server: Backend) -> None:
    url = server.url.replace("/test", "/manta_no_such_db")

    with pytest.raises(SourceError, match="database 'manta_no_such_db' does not exist"):
        await connect(SourceConfig(url=url), server.base_dir)


async def test_wrong_password_names_the_user_but_not_the_password(tmp_path: Path) -> None:
    # PostgreSQL here trusts every local connection, so passwords are checked on MariaDB.
    admin = await _mariadb_admin()
    user, password, wrong = f"manta_{uuid.uuid4().hex[:8]}", "Right:pw@1%", "Wr0ng:pw@2%"
    async with admin.cursor() as cursor:
        await cursor.execute(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
        await cursor.execute(f"GRANT SELECT ON test.* TO '{user}'@'%'")
    try:
        url = f"mysql://{user}:Wr0ng%3Apw%402%25@127.0.0.1:3306/test"
        with pytest.raises(SourceError) as caught:
            await connect(SourceConfig(url=url), tmp_path, "shop")

        # The right password, percent-encoded in the url, is decoded before use.
        good = f"mysql://{user}:Right%3Apw%401%25@127.0.0.1:3306/test"
        async with await connect(SourceConfig(url=good), tmp_path) as source:
            _, _, chunks = await read_all(source, "SELECT CURRENT_USER()", 10)
    finally:
        async with admin.cursor() as cursor:
            await cursor.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        admin.close()

    message = str(caught.value)
    assert user in message
    assert "check the user and password" in message
    assert wrong not in message and "Wr0ng" not in message and password not in message
    assert chunks == [[(f"{user}@%",)]]


async def test_postgres_unknown_role_names_the_user(tmp_path: Path) -> None:
    url = "postgresql://manta_nobody:secret-pw@127.0.0.1:5432/test"

    with pytest.raises(SourceError) as caught:
        await connect(SourceConfig(url=url), tmp_path)

    message = str(caught.value)
    if "cannot connect" in message:
        pytest.skip(f"PostgreSQL is not reachable: {message}")
    assert "manta_nobody" in message and "check the user and password" in message
    assert "secret-pw" not in message


# --- SQLite files ----------------------------------------------------------------------------


async def test_missing_sqlite_file_raises_and_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file") as caught:
        await connect(SourceConfig(url="sqlite:///missing.db"), tmp_path, "local")

    assert "[sources.local]" in str(caught.value)
    assert not (tmp_path / "missing.db").exists()


async def test_sqlite_paths_are_relative_to_base_dir_or_absolute(tmp_path: Path) -> None:
    (tmp_path / "sub dir").mkdir()
    path = tmp_path / "sub dir" / "my.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE t (x INTEGER)")
    db.close()

    for url in ("sqlite:///sub%20dir/my.db", f"sqlite:///{path}"):
        async with await connect(SourceConfig(url=url), tmp_path) as source:
            _, _, chunks = await read_all(source, "SELECT count(*) FROM t", 10)
        assert chunks == [[(0,)]]


async def test_sqlite_file_that_is_not_a_database_raises(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not a database at all, just some text" * 10)

    with pytest.raises(SourceError, match="SQLite database"):
        await connect(SourceConfig(url="sqlite:///junk.db"), tmp_path)


async def test_sqlite_expressions_have_no_declared_type(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "t.db") as db:
        db.execute("CREATE TABLE t (x VARCHAR(20), y INTEGER)")
    db.close()

    async with await connect(SourceConfig(url="sqlite:///t.db"), tmp_path) as source:
        names, types, _ = await read_all(source, "SELECT x, y + 1 AS z, y FROM t;", 10)

    assert names == ["x", "z", "y"]
    assert types == ["varchar(20)", "", "integer"]


# --- urls --------------------------------------------------------------------------------------


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("mysql://app:s%40cret@db:3306/shop") == "mysql://app:***@db:3306/shop"
    assert mask_url("postgresql://app@db/shop") == "postgresql://app@db/shop"
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"


def test_server_url_decodes_user_and_password() -> None:
    url = "postgres://us%40er:p%3Ass%2Fw@db.example:6543/my%20db"

    parts = ServerUrl.parse(url, Origin(url))

    assert (parts.user, parts.password) == ("us@er", "p:ss/w")
    assert (parts.host, parts.port, parts.database) == ("db.example", 6543, "my db")
    assert "p:ss" not in repr(parts) and "p%3Ass" not in repr(Origin(url))


def test_server_url_rejects_options() -> None:
    url = "postgresql://app:pw@db/shop?sslmode=require"

    with pytest.raises(SourceError, match=r"not supported in postgresql://app:\*\*\*@db/shop"):
        ServerUrl.parse(url, Origin(url))
