"""`serve` as a real process: draining, its schedule, SIGTERM, and `run --once` beside it."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from manta_async import agent
from manta_async.config import Config
from manta_async.locks import EXTRACT, StateLock
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT * FROM items"
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="needs POSIX signals")


async def start(config: Config, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manta_async", "-c", str(config.path), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def until(check: object, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not true within {timeout_s}s")


async def stop(process: asyncio.subprocess.Process, terminate: bool = True) -> tuple[int, str]:
    if terminate and process.returncode is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.fixture
def source(tmp_path: Path) -> SqliteDb:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"v{i}") for i in range(40)])
    return db


@pytest.fixture
async def serving(
    store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> AsyncIterator[tuple[Config, asyncio.subprocess.Process]]:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=10)  # fmt: skip
    process = await start(config, "serve", "--every", "1s")
    yield config, process
    await stop(process)


def copies_equal(store: StoreServer, source: SqliteDb) -> object:
    async def equal() -> bool:
        try:
            return await store_rows(store, "items") == source.encoded_rows(SQL)
        except AssertionError:
            return False

    return equal


async def test_serve_every_syncs_changes_and_exits_cleanly_on_sigterm(
    serving: tuple[Config, asyncio.subprocess.Process], store: StoreServer, source: SqliteDb
) -> None:
    _config, process = serving
    equal = copies_equal(store, source)

    await until(equal)
    source.execute("UPDATE items SET v = 'changed' WHERE id % 3 = 0")
    source.execute("DELETE FROM items WHERE id > 35")
    await until(equal)

    code, stderr = await stop(process)
    assert code == 0, stderr


async def test_run_once_beside_serve_hands_its_batches_over(
    store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=10)  # fmt: skip
    process = await start(config, "serve")
    assert process.stderr is not None
    first_line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
    assert b"serving: draining" in first_line
    try:
        # serve holds the drain lock: run --once stages, then waits for serve to deliver.
        changes = ("INSERT INTO items VALUES (100, 'from cron')", "DELETE FROM items WHERE id > 30")
        for change in changes:
            source.execute(change)
            report = await agent.run_once(config, ["items"])
            assert report.handed_over
            assert report.exit_code == agent.EXIT_OK
            assert await store_rows(store, "items") == source.encoded_rows(SQL)
    finally:
        code, stderr = await stop(process)
    assert code == 0, stderr


async def test_a_second_extracting_run_exits_6(
    store: StoreServer, source: SqliteDb, make_config: MakeConfig
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}})
    lock = StateLock(config.state_dir, EXTRACT)
    lock.acquire()
    try:
        process = await start(config, "run", "--once")
        code, stderr = await stop(process, terminate=False)
    finally:
        lock.release()
    assert code == agent.EXIT_LOCKED
    assert "another manta-async process is reading tables" in stderr


async def test_sigterm_while_the_store_is_down_keeps_the_batches(
    source: SqliteDb, make_config: MakeConfig, unused_tcp_port: int, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    config = make_config(url, source.url, {"items": {"sql": SQL, "key": ["id"]}}, batch_rows=10)
    report = await agent.run_once(config, ["items"], drain=False)
    assert report.counts["pending"] == 4

    process = await start(config, "serve")
    await asyncio.sleep(2.0)
    started = time.monotonic()
    code, stderr = await stop(process)

    assert code == 0, stderr
    assert time.monotonic() - started < 5
    counts = await agent.queue_counts(config)
    assert counts["pending"] == 4 and counts["acked"] == 0

    async with StoreServer(tmp_path / "late-store", "test-token", port=unused_tcp_port) as store:
        report = await agent.run_once(config, ["items"])
        assert report.exit_code == agent.EXIT_OK
        assert await store_rows(store, "items") == source.encoded_rows(SQL)
