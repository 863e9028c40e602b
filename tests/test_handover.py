"""A run that found the drain lock taken waits for the drainer, and drains itself once the
drainer is gone, instead of waiting out its whole retry budget with its batches queued.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from manta_async import agent
from manta_async.locks import DRAIN, StateLock
from manta_async.queue.batchqueue import BatchQueue
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT id, name FROM items"


async def test_a_run_drains_its_batches_when_the_other_drainer_ends(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(20)])
    config = make_config(store.url, db.url, {"items": {"sql": SQL, "key": ["id"]}},
                         store={"retry_for_s": 20})  # fmt: skip

    # Another run is finishing its drain: it holds the lock, then lets go without having seen
    # this run's batches.
    other = StateLock(config.state_dir, DRAIN)
    other.acquire()
    started = time.monotonic()
    run = asyncio.create_task(agent.run_once(config, ["items"]))
    await asyncio.sleep(1.0)
    other.release()
    report = await asyncio.wait_for(run, timeout=30)

    assert report.exit_code == agent.EXIT_OK
    assert time.monotonic() - started < 10, "the run waited out its retry budget"
    assert await store_rows(store, "items") == db.encoded_rows(SQL)


async def test_a_handed_over_run_exits_0_once_its_own_batches_are_delivered(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    for table in ("a", "b"):
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany(f"INSERT INTO {table} VALUES (?, ?)", [(i, f"{i}") for i in range(5)])
    tables = {t: {"sql": f"SELECT id, name FROM {t}", "key": ["id"]} for t in ("a", "b")}
    config = make_config(store.url, db.url, tables, store={"retry_for_s": 20})

    # serve holds the drain lock and has batches of its own (table b) still to send.
    await agent.run_once(config, ["b"], drain=False)
    serve = StateLock(config.state_dir, DRAIN)
    serve.acquire()
    try:
        run = asyncio.create_task(agent.run_once(config, ["a"]))
        await deliver_table(config.state_dir, "a")
        report = await asyncio.wait_for(run, timeout=30)
    finally:
        serve.release()

    assert report.handed_over
    assert report.counts["pending"] == 1, "b's batch is serve's business"
    assert report.exit_code == agent.EXIT_OK


async def deliver_table(state_dir: Path, table: str) -> None:
    """Play serve: ack the batches of `table` as soon as they are queued."""
    async with BatchQueue(state_dir, drain=False) as queue:
        for _ in range(100):
            entries = await queue.call(queue.entries)
            mine = [e.pqid for e in entries if e.table == table]
            if mine:
                for pqid in mine:
                    await queue.call(queue.ack, pqid)
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"no batch of table {table} was queued")
