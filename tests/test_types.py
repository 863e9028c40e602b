"""Every value arrives exactly, and an unchanged row never looks changed.

Tables are synced through the real agent into a real store on PostgreSQL, MariaDB and SQLite.
Every cell read back from the store, decoded with `codec.decode_value`, must equal the value
the database's own driver reads, and a rerun with no change in the source must send nothing.

Each kind of value that is easy to get wrong has a named case: decimal scale, JSON spelling,
intervals, special floats, MySQL zero dates, composite keys, duplicate and NULL keys, MySQL
TIMESTAMP across time zones, binary strings.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pymysql
import pytest

from manta_async import agent
from manta_async.config import Config
from manta_async.diff import codec
from manta_async.store import StoreServer
from tests.conftest import TOKEN, MakeConfig, unique_name
from tests.dbs import MysqlDb, PostgresDb, SourceDb, SqliteDb, decode_lines

Changes = tuple[int, int, int]
"""Inserts, updates and deletes of one table's run."""


# --- the source, read with the database's own driver ---------------------------------------


async def pg_rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    """The rows of `sql` as asyncpg returns them, except intervals as (months, days, µs):
    asyncpg's default folds a month into 30 days, which would hide the very fault tested."""
    conn = await asyncpg.connect(url, server_settings={"TimeZone": "UTC"})
    try:
        await conn.set_type_codec(
            "interval", schema="pg_catalog", format="tuple", encoder=tuple, decoder=tuple
        )
        return [tuple(record) for record in await conn.fetch(sql)]
    finally:
        await conn.close()


def my_connect(relaxed: bool = False) -> Any:
    """A plain PyMySQL session in UTC; `relaxed` drops the SQL mode that refuses zero dates."""
    conn = pymysql.connect(
        host="127.0.0.1", port=3306, user="root", password="", database="manta_test",
        charset="utf8mb4", autocommit=True, init_command="SET time_zone = '+00:00'",
    )  # fmt: skip
    if relaxed:
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = ''")
    return conn


def my_rows(sql: str) -> list[tuple[Any, ...]]:
    conn = my_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return [tuple(row) for row in cur.fetchall()]
    finally:
        conn.close()


def my_execute(*statements: str, relaxed: bool = False) -> None:
    conn = my_connect(relaxed)
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def sqlite_rows(db: SqliteDb, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db.path) as conn:
        return [tuple(row) for row in conn.execute(sql)]


async def source_rows(db: SourceDb, sql: str) -> list[tuple[Any, ...]]:
    if isinstance(db, PostgresDb):
        return await pg_rows(db.url, sql)
    if isinstance(db, MysqlDb):
        return my_rows(sql)
    assert isinstance(db, SqliteDb)
    return sqlite_rows(db, sql)


def run_sql(db: SourceDb, *statements: str) -> None:
    for statement in statements:
        db.execute(statement)


# --- the store ------------------------------------------------------------------------------


async def store_wire(store: StoreServer, table: str) -> list[list[Any]]:
    """The store's rows of `table` as wire values, in the store's order (by key)."""
    url = f"{store.url}/v1/agents/test-agent/tables/{table}/rows?format=ndjson"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.get(url) as response:
            assert response.status == 200, await response.text()
            return list(decode_lines(await response.read()))


async def store_values(store: StoreServer, table: str) -> list[list[Any]]:
    """The store's rows of `table` decoded, sorted by their first column."""
    rows = [[codec.decode_value(v) for v in row] for row in await store_wire(store, table)]
    return sorted(rows, key=lambda row: repr(row[0]))


async def store_csv(store: StoreServer, table: str) -> str:
    url = f"{store.url}/v1/agents/test-agent/tables/{table}/rows?format=csv"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.get(url) as response:
            assert response.status == 200, await response.text()
            return await response.text()


# --- runs -----------------------------------------------------------------------------------


async def run(config: Config, *tables: str) -> dict[str, Changes]:
    """Run the agent once over `tables`; every table must succeed and every batch arrive."""
    report = await agent.run_once(config, list(tables))
    assert report.sync is not None
    errors = {o.table: o.error for o in report.sync.tables if o.error}
    assert not errors, errors
    assert report.exit_code == agent.EXIT_OK
    changes = {}
    for outcome in report.sync.tables:
        assert outcome.stats is not None
        stats = outcome.stats
        changes[outcome.table] = (stats.inserts, stats.updates, stats.deletes)
    return changes


def keyed(sql: str, key: list[str] | None = None) -> dict[str, Any]:
    return {"sql": sql, "key": key if key is not None else ["id"]}


def keyless(sql: str) -> dict[str, Any]:
    return {"sql": sql}


# --- comparing values -----------------------------------------------------------------------


def same(actual: Any, expected: Any) -> bool:
    """True when two values are the same value of the same type, to the last digit: NaN is
    itself, -0.0 is not 0.0, 1.10 is not 1.1, an aware time keeps its offset."""
    if isinstance(expected, list | tuple) and isinstance(actual, list | tuple):
        pairs = zip(actual, expected, strict=False)
        return len(actual) == len(expected) and all(same(a, e) for a, e in pairs)
    if not (isinstance(actual, type(expected)) or isinstance(expected, type(actual))):
        return False
    if isinstance(expected, float):
        return math.copysign(1, actual) == math.copysign(1, expected) and (
            actual == expected or (math.isnan(actual) and math.isnan(expected))
        )
    if isinstance(expected, Decimal):
        return str(actual) == str(expected)
    if isinstance(expected, dt.datetime | dt.time):
        return bool(actual == expected) and actual.utcoffset() == expected.utcoffset()
    return bool(actual == expected)


def assert_cells(
    columns: list[str], actual: list[list[Any]], expected: list[tuple[Any, ...]]
) -> None:
    """Compare row by row and cell by cell, naming the column and row of the first mismatch."""
    assert len(actual) == len(expected), f"{len(actual)} rows at the store, {len(expected)} read"
    for got_row, want_row in zip(actual, expected, strict=True):
        for name, got, want in zip(columns, got_row, want_row, strict=True):
            assert same(got, want), f"row {want_row[0]}, column {name}: {got!r} != {want!r}"


@pytest.fixture(params=["postgres", "mariadb"])
def server(request: pytest.FixtureRequest) -> SourceDb:
    if request.param == "postgres":
        return PostgresDb(request.getfixturevalue("pg_url"))
    return MysqlDb(request.getfixturevalue("mysql_url"))


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def any_db(request: pytest.FixtureRequest, tmp_path: Path) -> SourceDb:
    if request.param == "sqlite":
        return SqliteDb(tmp_path / "source.db")
    if request.param == "postgres":
        return PostgresDb(request.getfixturevalue("pg_url"))
    return MysqlDb(request.getfixturevalue("mysql_url"))


# --- decimals -------------------------------------------------------------------------------

DECIMALS = ["1.10", "100", "0.1", "-2.5", "0"]


async def test_widening_a_decimal_column_is_no_change(
    server: SourceDb, store: StoreServer, make_config: MakeConfig, tmp_path: Path
) -> None:
    t = unique_name("dec")
    run_sql(server, f"CREATE TABLE {t} (id int PRIMARY KEY, price decimal(10,2))")
    try:
        values = ", ".join(f"({i}, {v})" for i, v in enumerate(DECIMALS, start=1))
        run_sql(server, f"INSERT INTO {t} VALUES {values}, (9, NULL)")
        config = make_config(store.url, server.url, {
            t: keyed(f"SELECT * FROM {t}"), "bag": keyless(f"SELECT price FROM {t}"),
        })  # fmt: skip
        assert await run(config, t, "bag") == {t: (6, 0, 0), "bag": (6, 0, 0)}
        sent = await store_wire(store, t)

        # 1.10 becomes 1.1000 in the source: the same value, so neither table changes, and
        # the store keeps the text it was sent.
        if server.kind == "postgres":
            run_sql(server, f"ALTER TABLE {t} ALTER COLUMN price TYPE decimal(12,4)")
        else:
            run_sql(server, f"ALTER TABLE {t} MODIFY price decimal(12,4)")
        assert await run(config, t, "bag") == {t: (0, 0, 0), "bag": (0, 0, 0)}
        assert await store_wire(store, t) == sent
        assert [row[1] for row in sent[:3]] == [
            {"$dec": "1.10"}, {"$dec": "100.00"}, {"$dec": "0.10"},
        ]  # fmt: skip

        # A new value is one update; a keyless row is a new row in place of the old one.
        run_sql(server, f"UPDATE {t} SET price = 1.11 WHERE id = 1")
        assert await run(config, t, "bag") == {t: (0, 1, 0), "bag": (1, 0, 1)}
        # Equal in value: rows the update did not touch keep the scale they were sent with.
        source = await source_rows(server, f"SELECT * FROM {t} ORDER BY id")
        assert [tuple(row) for row in await store_values(store, t)] == source
        assert (await store_wire(store, t))[:2] == [[1, {"$dec": "1.1100"}], sent[1]]
    finally:
        run_sql(server, f"DROP TABLE {t}")


async def test_decimals_keep_every_digit_and_never_an_exponent(
    server: SourceDb, store: StoreServer, make_config: MakeConfig
) -> None:
    t = unique_name("digits")
    wide = "decimal(65,30)" if server.kind == "mariadb" else "numeric"
    run_sql(server, f"CREATE TABLE {t} (id int PRIMARY KEY, d38 decimal(38,18), d {wide})")
    try:
        rows = [
            (1, "12345678901234567890.123456789012345678", "100"),
            (2, "-99999999999999999999.999999999999999999", "1E+2"),
            (3, "0.000000000000000001", "0.0000001"),
            (4, "0", "123456789012345678901234567890.123456789"),
        ]
        values = ", ".join(f"({i}, {a}, {b})" for i, a, b in rows)
        run_sql(server, f"INSERT INTO {t} VALUES {values}")
        config = make_config(store.url, server.url, {t: keyed(f"SELECT * FROM {t}")})
        await run(config, t)

        # The wire carries the database's own text of each value, as a tagged string.
        text = "CAST({} AS CHAR)" if server.kind == "mariadb" else "{}::text"
        sql = f"SELECT id, {text.format('d38')}, {text.format('d')} FROM {t} ORDER BY id"
        source_text = await source_rows(server, sql)
        wire = await store_wire(store, t)
        assert [[r[0], r[1], r[2]] for r in wire] == [
            [i, {"$dec": a}, {"$dec": b}] for i, a, b in source_text
        ]
        assert "E" not in str(wire)
        source = await source_rows(server, f"SELECT * FROM {t} ORDER BY id")
        assert_cells(["id", "d38", "d"], await store_values(store, t), source)
    finally:
        run_sql(server, f"DROP TABLE {t}")


# --- JSON -----------------------------------------------------------------------------------


async def test_json_is_compared_by_content_not_spelling(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = PostgresDb(pg_url)
    t = unique_name("docs")
    run_sql(db, f"CREATE TABLE {t} (id int PRIMARY KEY, doc json)")
    try:
        docs = ['{"b":2,"a":1}', "[1,2]", '{"n": 1.50, "big": 123456789012345678901234567890}']
        db.executemany(f"INSERT INTO {t} VALUES ($1, $2)", list(enumerate(docs, start=1)))
        run_sql(db, f"INSERT INTO {t} VALUES (4, NULL), (5, '\"naïve 🍰\"')")
        config = make_config(store.url, db.url, {
            t: keyed(f"SELECT * FROM {t}"), "bag": keyless(f"SELECT doc FROM {t}"),
        })  # fmt: skip
        assert await run(config, t, "bag") == {t: (5, 0, 0), "bag": (5, 0, 0)}

        # The wire carries the database's text; decoded, it is the document, to the digit.
        source = await pg_rows(db.url, f"SELECT * FROM {t} ORDER BY id")
        wire = await store_wire(store, t)
        assert [row[1] for row in wire] == [None if d is None else {"$json": d} for _, d in source]
        expected = [
            (i, None if d is None else json.loads(d, parse_float=Decimal)) for i, d in source
        ]
        assert_cells(["id", "doc"], await store_values(store, t), expected)

        # The same document with its keys in another order, then as jsonb: no change at all.
        run_sql(db, f"""UPDATE {t} SET doc = '{{"a":1, "b":2}}' WHERE id = 1""")
        assert await run(config, t, "bag") == {t: (0, 0, 0), "bag": (0, 0, 0)}
        run_sql(db, f"ALTER TABLE {t} ALTER COLUMN doc TYPE jsonb")
        assert await run(config, t, "bag") == {t: (0, 0, 0), "bag": (0, 0, 0)}
        assert await store_wire(store, t) == wire

        # The order of an array's items is part of the document.
        run_sql(db, f"UPDATE {t} SET doc = '[2,1]' WHERE id = 2")
        assert await run(config, t, "bag") == {t: (0, 1, 0), "bag": (1, 0, 1)}
        assert (await store_wire(store, t))[1] == [2, {"$json": "[2, 1]"}]
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- intervals ------------------------------------------------------------------------------


def interval_parts(value: Any) -> Any:
    """An interval as (months, days, µs), the parts PostgreSQL keeps; NULL stays None."""
    if isinstance(value, dt.timedelta):
        return (0, 0, value // dt.timedelta(microseconds=1))
    return None if value is None else tuple(value)


async def test_postgres_intervals_keep_months_days_and_time_apart(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = PostgresDb(pg_url)
    t = unique_name("spans")
    spans = ["1 mon", "30 days", "1 day", "24 hours", "1 year 2 mons -3 days 04:05:06.789",
             "-838:59:59.000001", "0", "-1 days +02:00:00"]  # fmt: skip
    run_sql(db, f"CREATE TABLE {t} (id int PRIMARY KEY, span interval, spans interval[])")
    try:
        values = ", ".join(
            f"({i}, '{s}', ARRAY['{s}', NULL]::interval[])" for i, s in enumerate(spans)
        )
        run_sql(db, f"INSERT INTO {t} VALUES {values}, (99, NULL, NULL)")
        config = make_config(store.url, db.url, {t: keyed(f"SELECT * FROM {t}")})
        assert await run(config, t) == {t: (9, 0, 0)}

        # Each travels as PostgreSQL's own text and decodes to its three parts.
        texts = await pg_rows(db.url, f"SELECT id, span::text FROM {t} ORDER BY id")
        wire = await store_wire(store, t)
        assert [row[1] for row in wire] == [text and {"$interval": text} for _, text in texts]
        source = await pg_rows(db.url, f"SELECT * FROM {t} ORDER BY id")
        stored = [
            (i, interval_parts(span), spans and [interval_parts(s) for s in spans])
            for i, span, spans in await store_values(store, t)
        ]
        assert stored == source
        assert len({row[1] for row in stored}) == len(stored)

        # Unchanged: nothing to send. A month that becomes 30 days is a change.
        assert await run(config, t) == {t: (0, 0, 0)}
        run_sql(db, f"UPDATE {t} SET span = '30 days' WHERE span = '1 mon'")
        assert await run(config, t) == {t: (0, 1, 0)}
    finally:
        run_sql(db, f"DROP TABLE {t}")


async def test_mysql_time_round_trips_as_a_timedelta(
    mysql_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = MysqlDb(mysql_url)
    t = unique_name("clock")
    clocks = ["-838:59:59.000000", "838:59:59", "00:00:00", "-00:00:00.000001", "12:34:56.5"]
    run_sql(db, f"CREATE TABLE {t} (id int PRIMARY KEY, at TIME(6))")
    try:
        values = ", ".join(f"({i}, '{c}')" for i, c in enumerate(clocks))
        run_sql(db, f"INSERT INTO {t} VALUES {values}, (99, NULL)")
        config = make_config(store.url, db.url, {t: keyed(f"SELECT * FROM {t}")})
        assert await run(config, t) == {t: (6, 0, 0)}

        source = my_rows(f"SELECT * FROM {t} ORDER BY id")
        assert_cells(["id", "at"], await store_values(store, t), source)
        wire = await store_wire(store, t)
        assert wire[0][1] == {"$interval": "-838:59:59"}
        assert wire[3][1] == {"$interval": "-00:00:00.000001"}
        assert await run(config, t) == {t: (0, 0, 0)}
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- dates and times Python cannot hold -----------------------------------------------------

PG_EDGES = [
    ("infinity", "infinity", "infinity", "24:00:00", "24:00:00+02"),
    ("-infinity", "-infinity", "-infinity", "00:00:00", "00:00:00-03:30"),
    ("9999-12-31", "9999-12-31 23:59:59.999999", "9999-12-31 23:59:59.999999+00",
     "23:59:59.999999", "23:59:59.999999+14"),
    ("0001-01-01", "0001-01-01 00:00:00", "0001-01-01 00:00:00+00", "12:00:00.5", "12:00:00+00"),
    ("10000-01-01", "10000-01-01 00:00:00", "12345-06-07 08:09:10.5+00", None, None),
    ("0044-03-15 BC", "0001-12-31 23:59:59 BC", None, None, None),
]  # fmt: skip


async def test_postgres_infinity_and_far_dates_arrive_as_themselves(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = PostgresDb(pg_url)
    t = unique_name("edges")
    run_sql(
        db,
        f"""CREATE TABLE {t} (id int PRIMARY KEY, d date, ts timestamp,
                    tstz timestamptz, t time, ttz timetz, ds date[])""",
    )
    try:
        rows = [(i, *edge, [edge[0], None]) for i, edge in enumerate(PG_EDGES, start=1)]
        db.executemany(
            f"INSERT INTO {t} VALUES ($1, $2::text::date, $3::text::timestamp, "
            "$4::text::timestamptz, $5::text::time, $6::text::timetz, $7::text[]::date[])",
            rows,
        )
        run_sql(db, f"INSERT INTO {t} (id) VALUES (99)")
        config = make_config(store.url, db.url, {t: keyed(f"SELECT * FROM {t}")})
        assert await run(config, t) == {t: (7, 0, 0)}

        # Infinity and 24:00:00 are their words, far years ISO 8601's expanded years (year 0
        # is 1 BC); 9999-12-31 stays a date of its own.
        wire = await store_wire(store, t)
        assert wire[0][1:6] == [{"$date": "infinity"}, {"$ts": "infinity"},
                                {"$tstz": "infinity"}, {"$time": "24:00:00.000000"},
                                {"$timetz": "24:00:00.000000+02:00"}]  # fmt: skip
        assert wire[1][1:4] == [{"$date": "-infinity"}, {"$ts": "-infinity"},
                                {"$tstz": "-infinity"}]  # fmt: skip
        assert wire[4][1:4] == [{"$date": "+10000-01-01"},
                                {"$ts": "+10000-01-01T00:00:00.000000"},
                                {"$tstz": "+12345-06-07T08:09:10.500000+00:00"}]  # fmt: skip
        assert wire[5][1:3] == [{"$date": "-0043-03-15"}, {"$ts": "0000-12-31T23:59:59.000000"}]
        assert wire[0][6] == [{"$date": "infinity"}, None]
        assert wire[2][1] == {"$date": "9999-12-31"}

        # The values Python holds are the ones asyncpg reads; the others decode to their text.
        plain = await pg_rows(db.url, f"SELECT * FROM {t} WHERE id IN (3, 4, 99) ORDER BY id")
        stored = await store_values(store, t)
        assert_cells(["id", "d", "ts", "tstz", "t", "ttz", "ds"], stored[2:4] + stored[6:], plain)
        assert stored[0][1:3] == ["infinity", "infinity"]

        # Unchanged: nothing to send. Infinity becoming 9999-12-31 is a change.
        assert await run(config, t) == {t: (0, 0, 0)}
        run_sql(db, f"UPDATE {t} SET d = '9999-12-31' WHERE id = 1")
        assert await run(config, t) == {t: (0, 1, 0)}
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- MySQL zero dates -----------------------------------------------------------------------

ZERO_DATES = [
    ("0000-00-00", "0000-00-00 00:00:00", "0000-00-00 00:00:00"),
    ("2016-00-00", "2016-00-00 10:00:00", None),
    (None, None, None),
    ("2024-02-29", "2024-02-29 12:34:56.789", "2024-02-29 12:34:56.789"),
    ("2016-05-00", "2016-05-00 00:00:00", None),
]


def sql_literal(value: str | None) -> str:
    return "NULL" if value is None else f"'{value}'"


async def test_mysql_zero_and_partial_dates_arrive_as_they_are(
    mysql_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = MysqlDb(mysql_url)
    t = unique_name("zero")
    run_sql(
        db,
        f"""CREATE TABLE {t} (id int PRIMARY KEY, d DATE NULL, dt DATETIME(6) NULL,
                    ts TIMESTAMP(6) NULL DEFAULT NULL)""",
    )
    try:
        # Only a session with a relaxed sql_mode may write them; any session reads them.
        values = ", ".join(
            f"({i}, {', '.join(sql_literal(v) for v in row)})"
            for i, row in enumerate(ZERO_DATES, start=1)
        )
        my_execute(f"INSERT INTO {t} VALUES {values}", relaxed=True)
        config = make_config(store.url, db.url, {
            t: keyed(f"SELECT * FROM {t}"), "bag": keyless(f"SELECT d FROM {t}"),
        })  # fmt: skip
        assert await run(config, t, "bag") == {t: (5, 0, 0), "bag": (5, 0, 0)}

        # Each is the server's text under its column's tag, and decodes to what PyMySQL reads.
        wire = await store_wire(store, t)
        assert wire[0][1:] == [{"$date": "0000-00-00"},
                               {"$ts": "0000-00-00 00:00:00.000000"},
                               {"$ts": "0000-00-00 00:00:00.000000"}]  # fmt: skip
        assert wire[1][1] == {"$date": "2016-00-00"} and wire[2][1:] == [None, None, None]
        source = my_rows(f"SELECT * FROM {t} ORDER BY id")
        assert_cells(["id", "d", "dt", "ts"], await store_values(store, t), source)
        assert len(await store_wire(store, "bag")) == 5
        assert sorted(codec.dumps(row) for row in wire) == db.encoded_rows(f"SELECT * FROM {t}")

        # Unchanged: nothing to send. A zero date becoming NULL is one change.
        assert await run(config, t, "bag") == {t: (0, 0, 0), "bag": (0, 0, 0)}
        run_sql(db, f"UPDATE {t} SET d = NULL WHERE id = 1")
        assert (await run(config, t, "bag"))[t] == (0, 1, 0)
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- special floats -------------------------------------------------------------------------

SPECIAL_FLOATS = ["'NaN'", "'Infinity'", "'-Infinity'", "NULL", "'-0'", "0"]


async def test_special_floats_are_themselves_and_distinct(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = PostgresDb(pg_url)
    t = unique_name("floats")
    run_sql(db, f"CREATE TABLE {t} (id int PRIMARY KEY, f8 double precision, f4 real)")
    try:
        values = ", ".join(f"({i}, {v}, {v})" for i, v in enumerate(SPECIAL_FLOATS, start=1))
        run_sql(db, f"INSERT INTO {t} VALUES {values}")
        config = make_config(store.url, db.url, {
            t: keyed(f"SELECT * FROM {t}"), "bag": keyless(f"SELECT f8 FROM {t}"),
        })  # fmt: skip
        assert await run(config, t, "bag") == {t: (6, 0, 0), "bag": (6, 0, 0)}

        # Each comes back as itself, never as NULL; -0.0 keeps its sign, as PostgreSQL does.
        wire = await store_wire(store, t)
        assert [row[1] for row in wire] == [
            {"$float": "NaN"}, {"$float": "Infinity"}, {"$float": "-Infinity"}, None, -0.0, 0.0,
        ]  # fmt: skip
        source = await pg_rows(db.url, f"SELECT * FROM {t} ORDER BY id")
        assert_cells(["id", "f8", "f4"], await store_values(store, t), source)
        hashes = {codec.row_hash(codec.dumps([row[1]])) for row in wire}
        assert len(hashes) == 6 and len(await store_wire(store, "bag")) == 6

        # Unchanged: nothing. NaN becoming NULL is one update, -0 becoming 0 another.
        assert await run(config, t, "bag") == {t: (0, 0, 0), "bag": (0, 0, 0)}
        run_sql(db, f"UPDATE {t} SET f8 = NULL, f4 = NULL WHERE id = 1")
        assert (await run(config, t, "bag"))[t] == (0, 1, 0)
        run_sql(db, f"UPDATE {t} SET f8 = 0 WHERE id = 5")
        assert (await run(config, t, "bag"))[t] == (0, 1, 0)
    finally:
        run_sql(db, f"DROP TABLE {t}")


async def test_sqlite_infinities_and_negative_zero_are_themselves(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    # SQLite stores NaN as NULL, so NaN cannot be tested here; an untyped column keeps -0.0.
    db = SqliteDb(tmp_path / "source.db")
    run_sql(db, "CREATE TABLE f (id INTEGER PRIMARY KEY, x)")
    db.executemany("INSERT INTO f VALUES (?, ?)", [
        (1, math.inf), (2, -math.inf), (3, None), (4, -0.0), (5, 0.0),
    ])  # fmt: skip
    config = make_config(store.url, db.url, {"f": keyed("SELECT * FROM f")})
    assert await run(config, "f") == {"f": (5, 0, 0)}
    wire = await store_wire(store, "f")
    assert [row[1] for row in wire] == [
        {"$float": "Infinity"}, {"$float": "-Infinity"}, None, -0.0, 0.0,
    ]  # fmt: skip
    assert_cells(["id", "x"], await store_values(store, "f"), sqlite_rows(db, "SELECT * FROM f"))
    assert await run(config, "f") == {"f": (0, 0, 0)}


# --- composite keys -------------------------------------------------------------------------


async def test_composite_keys_never_run_together(
    any_db: SourceDb, store: StoreServer, make_config: MakeConfig
) -> None:
    db = any_db
    docs, pairs = unique_name("lines"), unique_name("pairs")
    run_sql(db, f"CREATE TABLE {docs} (doc varchar(20), line varchar(20), v int)",
            f"CREATE TABLE {pairs} (a int, b int, v int)")  # fmt: skip
    try:
        run_sql(db, f"INSERT INTO {docs} VALUES ('doc-7', '12', 1), ('doc-71', '2', 2)",
                f"INSERT INTO {pairs} VALUES (1, 23, 1), (12, 3, 2)")  # fmt: skip
        config = make_config(store.url, db.url, {
            docs: keyed(f"SELECT * FROM {docs}", ["doc", "line"]),
            pairs: keyed(f"SELECT * FROM {pairs}", ["a", "b"]),
        })  # fmt: skip
        assert await run(config, docs, pairs) == {docs: (2, 0, 0), pairs: (2, 0, 0)}
        assert sorted(await store_wire(store, docs)) == [["doc-7", "12", 1], ["doc-71", "2", 2]]
        assert sorted(await store_wire(store, pairs)) == [[1, 23, 1], [12, 3, 2]]

        # Deleting one key deletes only it.
        run_sql(db, f"DELETE FROM {docs} WHERE doc = 'doc-7'",
                f"DELETE FROM {pairs} WHERE a = 12")  # fmt: skip
        assert await run(config, docs, pairs) == {docs: (0, 0, 1), pairs: (0, 0, 1)}
        assert await store_wire(store, docs) == [["doc-71", "2", 2]]
        assert await store_wire(store, pairs) == [[1, 23, 1]]
    finally:
        run_sql(db, f"DROP TABLE {docs}", f"DROP TABLE {pairs}")


# --- duplicate and NULL keys ----------------------------------------------------------------


async def test_duplicate_and_null_keys_fail_the_table_and_keep_the_last_state(
    any_db: SourceDb, store: StoreServer, make_config: MakeConfig
) -> None:
    db = any_db
    orders, lines, codes = unique_name("orders"), unique_name("lines"), unique_name("codes")
    run_sql(db, f"CREATE TABLE {orders} (id int PRIMARY KEY, total int)",
            f"CREATE TABLE {lines} (order_id int, sku varchar(10))",
            f"CREATE TABLE {codes} (code varchar(10), v int)")  # fmt: skip
    try:
        run_sql(db, f"INSERT INTO {orders} VALUES (1, 10), (2, 20), (3, 30)",
                f"INSERT INTO {lines} VALUES (1, 'a'), (2, 'b')",
                f"INSERT INTO {codes} VALUES ('x', 1), (NULL, 2)")  # fmt: skip
        joined = (f"SELECT o.id, o.total, l.sku FROM {orders} o "
                  f"LEFT JOIN {lines} l ON l.order_id = o.id")  # fmt: skip
        config = make_config(store.url, db.url, {
            "joined": keyed(joined), "codes": keyed(f"SELECT * FROM {codes}", ["code"]),
        })  # fmt: skip
        assert await run(config, "joined", "codes") == {"joined": (3, 0, 0), "codes": (2, 0, 0)}
        before = {name: await store_wire(store, name) for name in ("joined", "codes")}

        # A second line makes the join return order 2 twice; a second NULL code, two NULL keys.
        run_sql(db, f"INSERT INTO {lines} VALUES (2, 'c')", f"UPDATE {orders} SET total = 11",
                f"INSERT INTO {codes} VALUES (NULL, 3)")  # fmt: skip
        report = await agent.run_once(config, ["joined", "codes"])
        assert report.exit_code == agent.EXIT_TABLE_FAILED
        assert report.sync is not None
        errors = {o.table: o.error or "" for o in report.sync.tables}
        assert "key id = [2] occurs 2 times" in errors["joined"]
        assert "key code = [null] occurs 2 times" in errors["codes"]
        assert "nothing was sent" in errors["joined"]
        assert report.counts.get("pending", 0) == 0
        assert report.drain is not None and report.drain.applied == 0
        assert {name: await store_wire(store, name) for name in before} == before

        # Fixed, the next run sends exactly what changed since the last good run.
        run_sql(db, f"DELETE FROM {lines} WHERE sku = 'c'", f"DELETE FROM {codes} WHERE v = 3")
        assert await run(config, "joined", "codes") == {"joined": (0, 3, 0), "codes": (0, 0, 0)}
    finally:
        run_sql(db, f"DROP TABLE {orders}", f"DROP TABLE {lines}", f"DROP TABLE {codes}")


# --- MySQL TIMESTAMP and the server's time zone ---------------------------------------------


def zone_tables_loaded() -> bool:
    return bool(my_rows("SELECT count(*) FROM mysql.time_zone_name")[0][0])


def load_zone_tables() -> None:
    """Load the server's named time zones from the system's zoneinfo, as the docs say to."""
    import subprocess

    sql = subprocess.run(["mariadb-tzinfo-to-sql", "/usr/share/zoneinfo"], check=True,
                         capture_output=True).stdout  # fmt: skip
    subprocess.run(["mariadb", "-h127.0.0.1", "-uroot", "mysql"], input=sql, check=True,
                   capture_output=True)  # fmt: skip


@pytest.fixture
def server_zone(mysql_url: str) -> Iterator[Callable[[str], None]]:
    """Set the server's global time_zone for the test; the old one comes back afterwards."""
    if not zone_tables_loaded():
        load_zone_tables()
    (old,) = my_rows("SELECT @@GLOBAL.time_zone")[0]

    def set_zone(zone: str) -> None:
        my_execute(f"SET GLOBAL time_zone = '{zone}'")

    yield set_zone
    set_zone(old)


async def test_mysql_timestamp_keeps_instants_whatever_the_server_zone(
    mysql_url: str, server_zone: Callable[[str], None], store: StoreServer, make_config: MakeConfig
) -> None:
    db = MysqlDb(mysql_url)
    t = unique_name("instants")
    server_zone("Europe/Berlin")
    run_sql(db, f"CREATE TABLE {t} (id int PRIMARY KEY, at TIMESTAMP(6) NULL DEFAULT NULL)")
    try:
        # 00:30 and 01:30 UTC are both 02:30 in Berlin on 2024-10-27, when clocks go back.
        run_sql(db, f"INSERT INTO {t} VALUES (1, '2024-10-27 00:30:00'), "
                    f"(2, '2024-10-27 01:30:00'), (3, NULL)")  # fmt: skip
        config = make_config(store.url, db.url, {t: keyed(f"SELECT * FROM {t}")})
        assert await run(config, t) == {t: (3, 0, 0)}
        stored = await store_values(store, t)
        assert [row[1] for row in stored] == [
            dt.datetime(2024, 10, 27, 0, 30), dt.datetime(2024, 10, 27, 1, 30), None,
        ]  # fmt: skip
        assert_cells(["id", "at"], stored, my_rows(f"SELECT * FROM {t} ORDER BY id"))

        # Another zone for the server: the same instants, so nothing to send.
        server_zone("America/New_York")
        assert await run(config, t) == {t: (0, 0, 0)}
        server_zone("+05:30")
        assert await run(config, t) == {t: (0, 0, 0)}
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- binary strings -------------------------------------------------------------------------

BINARY = {
    "sqlite": "CREATE TABLE {t} (k BLOB, v BLOB)",
    "postgres": "CREATE TABLE {t} (k bytea, v bytea)",
    "mariadb": "CREATE TABLE {t} (k BINARY(16), v VARBINARY(8))",
}
BINARY_LITERALS = {
    "sqlite": ("x'DEADBEEF'", "x''"),
    "postgres": ("'\\xDEADBEEF'::bytea", "''::bytea"),
    "mariadb": ("x'DEADBEEF'", "x''"),
}


async def test_binary_strings_arrive_byte_for_byte(
    any_db: SourceDb, store: StoreServer, make_config: MakeConfig
) -> None:
    db = any_db
    t = unique_name("bytes")
    run_sql(db, BINARY[db.kind].format(t=t))
    try:
        beef, empty = BINARY_LITERALS[db.kind]
        run_sql(db, f"INSERT INTO {t} VALUES ({beef}, {beef}), ({empty}, {empty}), (NULL, NULL)")
        config = make_config(store.url, db.url, {t: keyed(f"SELECT * FROM {t}", ["k"])})
        assert await run(config, t) == {t: (3, 0, 0)}

        # A value is the bytes the database holds: BINARY(16) pads with zeros, the others not.
        stored = sorted(await store_values(store, t), key=lambda row: (row[1] is None, row[1]))
        source = await source_rows(db, f"SELECT * FROM {t}")
        source = sorted(source, key=lambda row: (row[1] is None, row[1]))
        assert_cells(["k", "v"], stored, source)
        assert [row[1] for row in stored] == [b"", b"\xde\xad\xbe\xef", None]
        width = 16 if db.kind == "mariadb" else 0
        assert stored[1][0] == b"\xde\xad\xbe\xef".ljust(width, b"\x00")
        assert stored[0][0] == b"".ljust(width, b"\x00")

        # Unchanged: nothing. Deleting the empty one deletes only it.
        assert await run(config, t) == {t: (0, 0, 0)}
        run_sql(db, f"DELETE FROM {t} WHERE v = {empty}")
        assert await run(config, t) == {t: (0, 0, 1)}
        assert len(await store_wire(store, t)) == 2
    finally:
        run_sql(db, f"DROP TABLE {t}")


# --- network addresses ----------------------------------------------------------------------


def test_inet_and_cidr_values_decode_to_their_own_kinds() -> None:
    import ipaddress

    values = [
        ipaddress.ip_address("10.0.0.1"),
        ipaddress.ip_interface("10.0.0.1/8"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_interface("2001:db8::1/64"),
        ipaddress.ip_network("2001:db8::/32"),
    ]
    wire = [codec.encode_value(value) for value in values]
    assert wire[1:3] == [{"$inet": "10.0.0.1/8"}, {"$cidr": "10.0.0.0/8"}]
    assert [codec.decode_value(w) for w in wire] == values
    assert all(same(codec.decode_value(w), v) for w, v in zip(wire, values, strict=True))


# --- the type matrix ------------------------------------------------------------------------


def as_document(text: str) -> Any:
    return json.loads(text, parse_float=Decimal)


def as_interval(parts: tuple[int, int, int]) -> Any:
    """What (months, days, µs) decodes to: a timedelta when it is time only."""
    months, days, micros = parts
    return codec.Interval(*parts) if months or days else dt.timedelta(microseconds=micros)


async def check_matrix(
    db: SourceDb,
    table: str,
    store: StoreServer,
    make_config: MakeConfig,
    expect: dict[str, Callable[[Any], Any]],
) -> None:
    """Sync `table` (its first column `id`), compare every cell, rerun, expect nothing.

    `expect` maps a column to what the driver's value becomes at the store, where the
    extractor reads it otherwise than the plain driver (a JSON document is compared parsed).
    """
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: keyed(sql), "bag": keyless(sql)})
    rows = await source_rows(db, f"{sql} ORDER BY id")
    assert await run(config, table, "bag") == {table: (len(rows), 0, 0), "bag": (len(rows), 0, 0)}

    columns = [c.name for c in await result_columns(db, sql)]
    expected = [
        tuple(
            expect[name](v) if name in expect and v is not None else v
            for name, v in zip(columns, row, strict=True)
        )
        for row in rows
    ]
    assert_cells(columns, await store_values(store, table), expected)
    assert len(await store_wire(store, "bag")) == len(rows)

    assert await run(config, table, "bag") == {table: (0, 0, 0), "bag": (0, 0, 0)}


async def result_columns(db: SourceDb, sql: str) -> list[Any]:
    from manta_async.config import SourceConfig
    from manta_async.extract import connect

    async with await connect(SourceConfig(url=db.url), Path("."), "db") as source:
        async with source.read(f"{sql} LIMIT 0", chunk_rows=1) as result:
            return list(result.columns)


PG_MATRIX = """CREATE TYPE {t}_mood AS ENUM ('sad', 'ok', 'happy 😀');
CREATE TABLE {t} (
    id int PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, num numeric, num2 numeric(12,2),
    num38 numeric(38,18), f4 real, f8 double precision, flag boolean, ch char(5),
    vc varchar(20), tx text, by bytea, d date, t time, ttz timetz, ts timestamp(6),
    tstz timestamptz, iv interval, u uuid, js json, jb jsonb, ai int[], an numeric[],
    at text[], a2 int[][], mood {t}_mood, ip inet, net cidr, mac macaddr, bits bit varying(8),
    money money
)"""
PG_ROWS = [
    """(1, -32768, -2147483648, -9223372036854775808, -123456789012345678901234567890.5,
        -9999999999.99, -12345678901234567890.123456789012345678, -3.4e38, -1.7976931348623157e308,
        false, 'a', 'naïve', 'line
two', '\\x00ff', '0001-01-01', '00:00:00', '00:00:00-14', '0001-01-01 00:00:00',
        '1970-01-01 00:00:00+00', '-178000000 years', '00000000-0000-0000-0000-000000000000',
        '{{"b":2,"a":[1,2,{{"z":null}}]}}', '{{"b":2,"a":1}}', '{{1,NULL,-3}}',
        '{{1.10,NULL,100,NaN}}', '{{"a b","",NULL}}', '{{{{1,2}},{{3,4}}}}', 'sad', '10.0.0.1/8',
        '10.0.0.0/8', '08:00:2b:01:02:03', B'1010', -1.5)""",
    """(2, 32767, 2147483647, 9223372036854775807, 1E+2, 9999999999.99, 0.000000000000000001,
        1.1, 0.1, true, 'ab   ', '🍰🚀 €', repeat('x', 2000), '\\x', '9999-12-31',
        '23:59:59.999999', '23:59:59.999999+14', '9999-12-31 23:59:59.999999',
        '2024-03-31 01:30:00.123456+02', '1 year 2 mons -3 days 04:05:06.789',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '[]', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}',
        'happy 😀', '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', B'', 0)""",
    """(3, 0, 0, 0, 'NaN', 0, 0, '-0', '-0', NULL, '', '', '', NULL, '2024-02-29', '12:00:00',
        '12:00:00+05:30', '2024-02-29 12:00:00', '2024-02-29 12:00:00+00', '0',
        NULL, '"text"', 'null', NULL, NULL, NULL, NULL, 'ok', '192.168.0.1', '0.0.0.0/0',
        NULL, NULL, NULL)""",
]


async def test_postgres_type_matrix(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = PostgresDb(pg_url)
    t = unique_name("pgmatrix")
    run_sql(db, *PG_MATRIX.format(t=t).split(";\n"))
    try:
        run_sql(db, f"INSERT INTO {t} VALUES {', '.join(PG_ROWS).format()}, (99{', NULL' * 32})")
        expect: dict[str, Callable[[Any], Any]] = {
            "js": as_document, "jb": as_document, "iv": as_interval
        }  # fmt: skip
        expect["bits"] = lambda value: value.as_string()
        await check_matrix(db, t, store, make_config, expect)
    finally:
        run_sql(db, f"DROP TABLE {t}", f"DROP TYPE {t}_mood")


MY_MATRIX = """CREATE TABLE {t} (
    id int PRIMARY KEY, ti tinyint, tiu tinyint unsigned, si smallint, siu smallint unsigned,
    mi mediumint, miu mediumint unsigned, ii int, iiu int unsigned, bi bigint,
    biu bigint unsigned, d0 decimal(10,0), d2 decimal(12,2), d38 decimal(38,18),
    du decimal(5,2) unsigned, fl float, db double, flag tinyint(1), bo boolean, bits bit(10),
    b1 bit(1), ch char(5), vc varchar(20), tx text, lt longtext, bl blob, bn binary(4),
    vb varbinary(8), d date, t time(6), dt datetime(6), dt0 datetime,
    ts timestamp(6) NULL DEFAULT NULL, y year, js json, e enum('a', 'b c', '😀'),
    s set('x', 'y')
) CHARACTER SET utf8mb4"""
MY_ROWS = [
    """(1, -128, 0, -32768, 0, -8388608, 0, -2147483648, 0, -9223372036854775808, 0,
        -9999999999, -9999999999.99, -12345678901234567890.123456789012345678, 0, -3.40282e38,
        -1.7976931348623157e308, 0, false, b'0', b'0', 'a', 'naïve', 'line\ntwo', '', x'00ff',
        x'DEADBEEF', x'', '1000-01-01', '-838:59:59', '1000-01-01 00:00:00',
        '1000-01-01 00:00:00', '1970-01-01 00:00:01', 1901, '{"b":2,"a":[1,{"z":null}]}',
        'a', '')""",
    """(2, 127, 255, 32767, 65535, 8388607, 16777215, 2147483647, 4294967295,
        9223372036854775807, 18446744073709551615, 9999999999, 9999999999.99,
        0.000000000000000001, 999.99, 1.1, 0.1, 1, true, b'1111111111', b'1', 'ab   ',
        '🍰🚀 €', REPEAT('x', 2000), REPEAT('🚀', 100), x'', x'DE', x'DEADBEEFDEADBEEF',
        '9999-12-31', '838:59:59.000000', '9999-12-31 23:59:59.999999', '9999-12-31 23:59:59',
        '2038-01-19 03:14:07.999999', 2155, '[]', '😀', 'x,y')""",
    """(3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -0.0, 2, NULL, NULL, NULL, '', '', '',
        NULL, NULL, NULL, NULL, '2024-02-29', '00:00:00.000001', '2024-02-29 12:00:00.5',
        NULL, NULL, 0, '"text"', 'b c', 'y')""",
]


async def test_mysql_type_matrix(
    mysql_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db = MysqlDb(mysql_url)
    t = unique_name("mymatrix")
    run_sql(db, MY_MATRIX.format(t=t))
    try:
        run_sql(db, f"INSERT INTO {t} VALUES {', '.join(MY_ROWS)}, (99{', NULL' * 36})")
        await check_matrix(db, t, store, make_config, {})
    finally:
        run_sql(db, f"DROP TABLE {t}")


SQLITE_MATRIX = """CREATE TABLE {t} (id INTEGER PRIMARY KEY, i INTEGER, r REAL, n NUMERIC,
    dec DECIMAL(12,2), tx TEXT, b BLOB, bo BOOLEAN, d DATE, dt DATETIME, j JSON, x)"""
SQLITE_ROWS = [
    """(1, -9223372036854775808, -1.7976931348623157e308, '1.10', '100', 'naïve', x'DEADBEEF',
        0, '2024-02-29', '2024-02-29 12:00:00', '{"b":2,"a":1}', -0.0)""",
    """(2, 9223372036854775807, 9e999, 'abc', 0.1, '🍰🚀 €', x'', 1, '0000-00-00', '', '[]',
        -9e999)""",
    """(3, 0, 0.1, 12345678901234567890, '12345678901234567890.123456789012345678', '', x'00',
        'yes', 20240229, 1.5, 'not json', x'ff')""",
]


async def test_sqlite_type_matrix(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    run_sql(db, SQLITE_MATRIX.format(t="matrix"))
    run_sql(db, f"INSERT INTO matrix VALUES {', '.join(SQLITE_ROWS)}, (99{', NULL' * 11})")
    await check_matrix(db, "matrix", store, make_config, {})
