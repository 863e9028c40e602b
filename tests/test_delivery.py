"""Delivery through a real fault proxy: retries, Retry-After, lost acks, refused batches.

The proxy (tests/faultproxy.py) runs as its own process between the agent and a real store;
each test scripts what the batch requests meet and checks what reached the store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from manta_async import agent
from manta_async.config import Config
from manta_async.queue.batchqueue import BatchQueue
from manta_async.store import StoreServer
from tests.conftest import TOKEN, MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

PROXY = Path(__file__).with_name("faultproxy.py")


@dataclass
class Proxy:
    url: str

    async def script(self, actions: list[str]) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.url}/_faults", json=actions) as response:
                assert response.status == 200

    async def log(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.url}/_faults/log") as response:
                result: list[dict[str, Any]] = await response.json()
                return result


@pytest.fixture
async def proxy(store: StoreServer, unused_tcp_port: int) -> AsyncIterator[Proxy]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROXY), "--port", str(unused_tcp_port), "--upstream", store.url,
        "--lifetime", "120", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
    assert b"listening" in line
    yield Proxy(f"http://127.0.0.1:{unused_tcp_port}")
    process.terminate()
    await process.wait()


@pytest.fixture
def source(tmp_path: Path) -> SqliteDb:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT)")
    db.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO a VALUES (?, ?)", [(i, f"a{i}") for i in range(10)])
    db.executemany("INSERT INTO b VALUES (?, ?)", [(i, f"b{i}") for i in range(10)])
    return db


def two_tables(make_config: MakeConfig, url: str, db: SqliteDb, **store: Any) -> Config:
    tables = {t: {"sql": f"SELECT * FROM {t}", "key": ["id"]} for t in ("a", "b")}
    return make_config(url, db.url, tables, store=store or None, batch_rows=4)


async def assert_store_equals(store: StoreServer, db: SqliteDb) -> None:
    for t in ("a", "b"):
        assert await store_rows(store, t) == db.encoded_rows(f"SELECT * FROM {t}")


def applied_twice(store: StoreServer) -> int:
    with sqlite3.connect(store.data_dir / "store.db") as conn:
        dupes = conn.execute("SELECT count(*) FROM (SELECT tbl, seq FROM batches "
                             "GROUP BY tbl, seq HAVING count(*) > 1)").fetchone()[0]  # fmt: skip
    return int(dupes)


@pytest.mark.parametrize(
    "faults",
    [
        ["status:503", "status:502", "status:500"],
        ["reset-before", "reset-before"],
        ["reset-after"],
        ["cut-after"],
        ["delay:3"],
    ],
    ids=["5xx", "reset before the store", "ack lost after commit", "answer cut short", "timeout"],
)
async def test_transient_faults_are_retried_and_applied_once(
    faults: list[str], proxy: Proxy, store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    await proxy.script(faults)
    config = two_tables(make_config, proxy.url, source, timeout_s=1.0, retry_for_s=20)

    report = await agent.run_once(config, ["a", "b"])

    assert report.exit_code == agent.EXIT_OK
    assert report.drain is not None
    assert report.drain.applied + report.drain.duplicates == 6
    # A lost or cut answer means the store applied the batch: the resend is a duplicate. A
    # delayed request may reach the store before or after the resend that overtook it.
    lost_acks = sum(1 for f in faults if f in ("reset-after", "cut-after"))
    if faults == ["delay:3"]:
        assert report.drain.duplicates in (0, 1)
    else:
        assert report.drain.duplicates == lost_acks
    assert len(await proxy.log()) == 6 + len(faults)
    assert applied_twice(store) == 0
    await assert_store_equals(store, source)


@pytest.mark.parametrize("kind", ["retry-after", "retry-after-date"])
async def test_retry_after_is_honoured(
    kind: str, proxy: Proxy, store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    await proxy.script([f"{kind}:429:2"])
    config = two_tables(make_config, proxy.url, source, retry_for_s=20, max_backoff_s=0.1)

    report = await agent.run_once(config, ["a", "b"])

    assert report.exit_code == agent.EXIT_OK
    first, second = (await proxy.log())[:2]
    # Backoff alone would wait at most 0.1 s plus 0.5 s of jitter; Retry-After asked for 2 s
    # (an HTTP date has whole seconds, so it may come out up to a second shorter).
    assert second["at"] - first["at"] >= (1.9 if kind == "retry-after" else 1.0)
    await assert_store_equals(store, source)


async def test_refused_batch_is_parked_and_blocks_only_its_table(
    proxy: Proxy, store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    await proxy.script(["status:400"])
    config = two_tables(make_config, proxy.url, source)

    # a's first batch is refused: parked, a's later batches wait, b flows.
    report = await agent.run_once(config, ["a", "b"])
    assert report.exit_code == agent.EXIT_PARKED
    assert report.counts["failed"] == 1 and report.counts["pending"] == 2
    assert await store_rows(store, "b") == source.encoded_rows("SELECT * FROM b")
    async with BatchQueue(config.state_dir, drain=False) as queue:
        entries = await queue.call(queue.entries)
        failed = [e for e in entries if e.status == "failed"]
        assert [(e.table, e.seq) for e in failed] == [("a", 1)]
        assert "refused batch 1 of table 'a'" in (failed[0].reason or "")

        # A rerun keeps them waiting, in order; after a retry they all go.
        report = await agent.run_once(config, ["a", "b"])
        assert report.exit_code == agent.EXIT_PARKED
        assert await queue.call(queue.retry, failed[0].pqid)

    report = await agent.run_once(config, ["a", "b"])
    assert report.exit_code == agent.EXIT_OK
    await assert_store_equals(store, source)


async def test_wrong_token_stops_the_drain_and_keeps_the_batch(
    store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    config = two_tables(make_config, store.url, source, token="wrong")

    report = await agent.run_once(config, ["a", "b"])

    assert report.exit_code == agent.EXIT_ERROR
    assert report.drain is not None and "refused the token (401)" in (report.drain.refused or "")
    assert report.counts["pending"] == 6 and report.counts["failed"] == 0

    right = two_tables(make_config, store.url, source, token=TOKEN)
    report = await agent.run_once(right, ["a", "b"])
    assert report.exit_code == agent.EXIT_OK
    await assert_store_equals(store, source)


async def test_resync_replaces_a_table_stuck_behind_a_parked_batch(
    proxy: Proxy, store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    await proxy.script(["status:400"])
    config = two_tables(make_config, proxy.url, source)
    report = await agent.run_once(config, ["a", "b"])
    assert report.exit_code == agent.EXIT_PARKED

    source.execute("UPDATE a SET v = 'changed' WHERE id < 5")
    await agent.mark_resync(config, ["a"])
    report = await agent.run_once(config, ["a"])

    assert report.exit_code == agent.EXIT_OK
    assert report.counts["failed"] == 0
    await assert_store_equals(store, source)
