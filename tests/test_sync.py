"""The main job end to end, on each real database: extract → diff → queue → upload → store.

One contract suite runs against SQLite, PostgreSQL and MariaDB: a first run copies a table
of mixed types, inserts, updates and deletes reach the store on the next run, a rerun with no
change sends nothing, and the store's rows equal the source's, value for value.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from manta_async import agent
from manta_async.diff import codec
from manta_async.store import StoreServer
from tests.conftest import TOKEN, MakeConfig, unique_name
from tests.dbs import MysqlDb, PostgresDb, SourceDb, SqliteDb, decode_lines

MIXED = {
    "sqlite": """CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT, price TEXT, qty INTEGER,
                 ratio REAL, data BLOB, note TEXT)""",
    "postgres": """CREATE TABLE {t} (id integer PRIMARY KEY, name text, price numeric(12,2),
                   qty bigint, ratio double precision, data bytea, note text,
                   active boolean, created timestamptz, day date, uid uuid)""",
    "mariadb": """CREATE TABLE {t} (id INT PRIMARY KEY, name VARCHAR(200), price DECIMAL(12,2),
                  qty BIGINT, ratio DOUBLE, data BLOB, note TEXT, active TINYINT(1),
                  created DATETIME(6), day DATE) CHARACTER SET utf8mb4""",
}
_EXTRA = {"sqlite": 0, "postgres": 4, "mariadb": 3}


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> SourceDb:
    if request.param == "sqlite":
        return SqliteDb(tmp_path / "source.db")
    if request.param == "postgres":
        return PostgresDb(request.getfixturevalue("pg_url"))
    return MysqlDb(request.getfixturevalue("mysql_url"))


@pytest.fixture
def table(db: SourceDb) -> Iterator[str]:
    name = unique_name("mixed")
    db.execute(MIXED[db.kind].format(t=name))
    yield name
    db.execute(f"DROP TABLE {name}")


def mixed_row(kind: str, i: int, variant: int = 0) -> tuple[Any, ...]:
    price: Any = Decimal(f"{i * 3 + variant}.{i % 100:02d}")
    if kind == "sqlite":
        price = str(price)
    name = None if i % 17 == 0 else ("" if i % 13 == 0 else f"naïve café 🍰 {i} {variant}")
    base = (i, name, price, i * 10**12, i / 7 if i % 5 else None, bytes([i % 256, 0, 255]),
            None if i % 2 else f"note {i}")  # fmt: skip
    extra: tuple[Any, ...] = (
        i % 3 == 0,
        dt.datetime(2026, 1, 1, 12, 0, 0, i, tzinfo=dt.UTC),
        dt.date(2026, 1, 1) + dt.timedelta(days=i),
        uuid.UUID(int=i),
    )
    if kind == "mariadb":
        extra = (int(i % 3 == 0), extra[1].replace(tzinfo=None), extra[2])
    return base + extra[: _EXTRA[kind]]


def insert_sql(db: SourceDb, table: str, width: int) -> str:
    if db.kind == "postgres":
        marks = ", ".join(f"${n}" for n in range(1, width + 1))
    else:
        marks = ", ".join([db.placeholder()] * width)
    return f"INSERT INTO {table} VALUES ({marks})"


def put_rows(db: SourceDb, table: str, ids: range | list[int], variant: int = 0) -> None:
    rows = [mixed_row(db.kind, i, variant) for i in ids]
    db.executemany(insert_sql(db, table, len(rows[0])), rows)


async def store_rows(store: StoreServer, table: str, agent_name: str = "test-agent") -> list[bytes]:
    url = f"{store.url}/v1/agents/{agent_name}/tables/{table}/rows?format=ndjson"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.get(url) as response:
            assert response.status == 200, await response.text()
            body = await response.read()
    return sorted(codec.dumps(row) for row in decode_lines(body))


async def store_tables(store: StoreServer, agent_name: str = "test-agent") -> dict[str, Any]:
    url = f"{store.url}/v1/agents/{agent_name}/tables"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.get(url) as response:
            body = await response.json()
    return {t["table"]: t for t in body["tables"]}


def stats_of(report: agent.RunReport, table: str) -> tuple[int, int, int]:
    assert report.sync is not None
    outcome = next(o for o in report.sync.tables if o.table == table)
    assert outcome.stats is not None, outcome.error
    return outcome.stats.inserts, outcome.stats.updates, outcome.stats.deletes


async def test_contract_first_run_changes_and_rerun(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    put_rows(db, table, range(1, 301))
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}},
                         chunk_rows=64, batch_rows=100)  # fmt: skip

    # The first run copies every row.
    report = await agent.run_once(config, [table])
    assert report.exit_code == agent.EXIT_OK
    assert stats_of(report, table) == (300, 0, 0)
    assert report.drain is not None and report.drain.applied == 3
    assert await store_rows(store, table) == db.encoded_rows(sql)

    # Inserts, updates and deletes reach the store on the next run.
    put_rows(db, table, range(301, 306))
    db.execute(f"DELETE FROM {table} WHERE id IN (10, 20, 30)")
    db.execute(f"DELETE FROM {table} WHERE id IN (1, 2, 3, 4, 5, 6, 7)")
    put_rows(db, table, range(1, 8), variant=1)
    report = await agent.run_once(config, [table])
    assert report.exit_code == agent.EXIT_OK
    assert stats_of(report, table) == (5, 7, 3)
    assert await store_rows(store, table) == db.encoded_rows(sql)

    # A rerun with no change sends nothing.
    report = await agent.run_once(config, [table])
    assert stats_of(report, table) == (0, 0, 0)
    assert report.drain is not None and report.drain.applied == 0
    tables = await store_tables(store)
    assert tables[table]["last_seq"] == 5  # 3 batches, then the deletes and the upserts
    assert tables[table]["rows"] == 302


async def test_duplicate_keys_fail_only_that_table(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    put_rows(db, table, range(1, 21))
    fanout = f"SELECT id, name FROM {table} UNION ALL SELECT id, name FROM {table} WHERE id = 7"
    good = f"SELECT id, name FROM {table}"
    config = make_config(store.url, db.url, {"fanout": {"sql": fanout, "key": ["id"]},
                                             "good": {"sql": good, "key": ["id"]}})  # fmt: skip

    report = await agent.run_once(config, ["fanout", "good"])

    assert report.exit_code == agent.EXIT_TABLE_FAILED
    assert report.sync is not None
    failed = report.sync.failed
    assert [o.table for o in failed] == ["fanout"]
    assert "id = [7] occurs 2 times" in (failed[0].error or "")
    assert stats_of(report, "good") == (20, 0, 0)
    assert "fanout" not in await store_tables(store)
    assert await store_rows(store, "good") == db.encoded_rows(good)


async def test_store_down_keeps_batches_then_delivers_them_once(
    tmp_path: Path, make_config: MakeConfig, unused_tcp_port: int
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(50)])
    url = f"http://127.0.0.1:{unused_tcp_port}"
    config = make_config(url, db.url, {"items": {"sql": "SELECT * FROM items", "key": ["id"]}},
                         batch_rows=20)  # fmt: skip

    # The store is down: the run keeps its batches and says so.
    report = await agent.run_once(config, ["items"])
    assert report.exit_code == agent.EXIT_QUEUED
    assert report.counts["pending"] == 3
    assert report.drain is not None and report.drain.unreachable

    # A later run, with the store up, delivers each batch exactly once.
    db.execute("UPDATE items SET name = 'changed' WHERE id = 3")
    async with StoreServer(tmp_path / "store", token=TOKEN, port=unused_tcp_port) as store:
        report = await agent.run_once(config, ["items"])
        assert report.exit_code == agent.EXIT_OK
        assert report.drain is not None
        assert (report.drain.applied, report.drain.duplicates) == (4, 0)
        assert await store_rows(store, "items") == db.encoded_rows("SELECT * FROM items")
        assert (await store_tables(store))["items"]["last_seq"] == 4


async def test_shape_change_sends_the_table_again_and_store_replaces_it(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    put_rows(db, table, range(1, 41))
    sql = f"SELECT id, name, qty FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}}, batch_rows=15)
    await agent.run_once(config, [table])

    # A new column: the whole table goes again, and the store's columns follow.
    wider = f"SELECT id, name, qty, note FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": wider, "key": ["id"]}}, batch_rows=15)
    db.execute(f"DELETE FROM {table} WHERE id > 30")
    report = await agent.run_once(config, [table])

    assert report.exit_code == agent.EXIT_OK
    assert report.sync is not None and report.sync.tables[0].stats is not None
    stats = report.sync.tables[0].stats
    assert stats.snapshot == "its columns changed: new column note"
    assert (stats.inserts, stats.updates, stats.deletes) == (30, 0, 0)
    assert await store_rows(store, table) == db.encoded_rows(wider)
    info = (await store_tables(store))[table]
    assert [c["name"] for c in info["columns"]] == ["id", "name", "qty", "note"]
    assert info["rows"] == 30

    # The same shape again: back to sending changes only.
    report = await agent.run_once(config, [table])
    assert stats_of(report, table) == (0, 0, 0)


async def test_key_change_and_resync_resend_in_full(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE t (id INTEGER, code TEXT, v TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, f"c{i}", "x") for i in range(12)])
    sql = "SELECT * FROM t"
    await agent.run_once(make_config(store.url, db.url, {"t": {"sql": sql, "key": ["id"]}}), ["t"])

    by_code = make_config(store.url, db.url, {"t": {"sql": sql, "key": ["code"]}})
    report = await agent.run_once(by_code, ["t"])
    assert report.sync is not None and report.sync.tables[0].stats is not None
    assert report.sync.tables[0].stats.snapshot == "its key changed from ['id'] to ['code']"
    assert (await store_tables(store))["t"]["key"] == ["code"]

    await agent.mark_resync(by_code, ["t"])
    db.execute("DELETE FROM t")
    report = await agent.run_once(by_code, ["t"])
    assert report.sync is not None and report.sync.tables[0].stats is not None
    assert report.sync.tables[0].stats.snapshot == "a resync was asked for"
    assert report.exit_code == agent.EXIT_OK
    assert await store_rows(store, "t") == []
    assert (await store_tables(store))["t"]["rows"] == 0


async def test_lost_state_directory_recovers_by_resending(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    import shutil

    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(i, "x") for i in range(30)])
    config = make_config(store.url, db.url, {"t": {"sql": "SELECT * FROM t", "key": ["id"]}},
                         batch_rows=7)  # fmt: skip
    await agent.run_once(config, ["t"])
    await agent.run_once(config, ["t"])

    shutil.rmtree(config.state_dir)
    db.execute("DELETE FROM t WHERE id < 10")
    report = await agent.run_once(config, ["t"])

    assert report.exit_code == agent.EXIT_OK
    assert await store_rows(store, "t") == db.encoded_rows("SELECT * FROM t")
