"""A full disk in the state directory: one clear error naming the file, never a traceback,
and nothing lost once space is freed.

Each case makes one SQLite write of the agent fail with "database or disk is full" (as
SQLite reports ENOSPC) at a chosen statement, runs the agent, and checks the error; then
lets the writes through again and checks that the next run delivers everything once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from manta_async import agent
from manta_async.diff.index import Index
from manta_async.errors import MantaError
from manta_async.queue.batchqueue import _DurableAckQueue
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT id, name FROM items"


class _FullOn:
    """A SQLite connection whose statements starting with `prefix` fail as on a full disk."""

    def __init__(self, conn: sqlite3.Connection, prefix: str) -> None:
        self._conn = conn
        self._prefix = prefix

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql.startswith(self._prefix):
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextmanager
def index_full_on(prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real: property = Index.__dict__["conn"]
    assert real.fget is not None
    get = real.fget
    with monkeypatch.context() as patch:
        patch.setattr(Index, "conn", property(lambda self: _FullOn(get(self), prefix)))
        yield


@pytest.fixture
def source(tmp_path: Path) -> SqliteDb:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(30)])
    return db


async def test_full_disk_after_a_batch_was_queued_is_one_error_and_loses_nothing(
    source: SqliteDb, store: StoreServer, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=10)  # fmt: skip

    # The batch reached the queue, but the index cannot forget it from the outbox.
    with index_full_on("DELETE FROM outbox", monkeypatch):
        with pytest.raises(MantaError) as raised:
            await agent.run_once(config, ["items"])
    message = str(raised.value)
    assert "index.db" in message and "disk is full" in message
    assert "free space" in message

    # Space is back: the batch is put again, and the store takes it once.
    report = await agent.run_once(config, ["items"])
    assert report.exit_code == agent.EXIT_OK
    assert await store_rows(store, "items") == source.encoded_rows(SQL)


async def test_full_disk_when_acking_a_delivered_batch_is_one_error_and_sends_it_once(
    source: SqliteDb, store: StoreServer, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=10)  # fmt: skip

    # The store applied the batch; the queue cannot record it.
    def full(*args: Any, **kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as patch:
        patch.setattr(_DurableAckQueue, "ack", full)
        with pytest.raises(MantaError) as raised:
            await agent.run_once(config, ["items"])
    message = str(raised.value)
    assert "queue" in message and "disk is full" in message and "free space" in message

    # Space is back: the batch is sent again, and the store answers that it has it.
    report = await agent.run_once(config, ["items"])
    assert report.exit_code == agent.EXIT_OK
    assert report.drain is not None and report.drain.duplicates == 1
    assert await store_rows(store, "items") == source.encoded_rows(SQL)


def full_error() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database or disk is full")
    exc.sqlite_errorcode = sqlite3.SQLITE_FULL
    return exc


async def test_full_disk_when_opening_the_index_is_not_called_damage(
    source: SqliteDb, store: StoreServer, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}})
    real_connect = sqlite3.connect

    def connect(path: Any, *args: Any, **kwargs: Any) -> Any:
        conn = real_connect(path, *args, **kwargs)
        if str(path).endswith("index.db"):
            conn.close()
            raise full_error()
        return conn

    # Moving a sound index aside would throw away what was sent: the message must not say so.
    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", connect)
        with pytest.raises(MantaError) as raised:
            await agent.run_once(config, ["items"])
    message = str(raised.value)
    assert "disk is full" in message and "free space" in message
    assert "damaged" not in message and "move" not in message

    assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK


async def test_full_disk_when_opening_the_queue_is_not_called_damage(
    source: SqliteDb, store: StoreServer, make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(store.url, source.url, {"items": {"sql": SQL, "key": ["id"]}})
    real_connect = sqlite3.connect

    class FullOnCreate(_FullOn):
        def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
            if sql.startswith("CREATE TABLE IF NOT EXISTS manta_failures"):
                raise full_error()
            return self._conn.execute(sql, *args)

    def connect(path: Any, *args: Any, **kwargs: Any) -> Any:
        conn = real_connect(path, *args, **kwargs)
        return FullOnCreate(conn, "") if str(path).endswith("data.db") else conn

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", connect)
        with pytest.raises(MantaError) as raised:
            await agent.run_once(config, ["items"])
    message = str(raised.value)
    assert "disk is full" in message and "free space" in message
    assert "damaged" not in message and "move" not in message

    assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK
