"""Damaged state files are found when a run starts, and said so in one line with what to do.

SQLite's quick_check reports one line per problem, sometimes hundreds; the error shows the
first and counts the rest, so the command line still prints one red line.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from manta_async import agent
from manta_async.config import load_config
from manta_async.diff.index import FULL_CHECK_EVERY_S
from manta_async.errors import StateError
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT id, name FROM items"


def spoil_one_page(path: Path) -> None:
    """Overwrite part of one page so that quick_check reports many problems (and does not
    simply fail): the first page, from the third on, where that happens."""
    sound = path.read_bytes()
    for page in range(2, len(sound) // 4096):
        data = bytearray(sound)
        start = page * 4096 + 512
        data[start : start + 2048] = random.Random(1).randbytes(2048)
        path.write_bytes(bytes(data))
        if "\n" in quick_check(path):
            return
    raise AssertionError(f"no page of {path} gives a report of several lines")


def quick_check(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(row[0] for row in conn.execute("PRAGMA quick_check"))
    except sqlite3.DatabaseError:
        return "(fails at once)"
    finally:
        conn.close()


@pytest.mark.parametrize("damaged", ["index.db", "queue/data.db"])
async def test_a_damaged_state_file_is_one_line_saying_what_to_do(
    damaged: str, tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i:>40}") for i in range(3000)])
    config = make_config(store.url, db.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=100)  # fmt: skip
    assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK
    spoil_one_page(config.state_dir / damaged)

    with pytest.raises(StateError) as raised:
        await agent.run_once(config, ["items"])

    message = str(raised.value)
    assert "\n" not in message
    assert "is damaged" in message and "aside" in message and "resync" in message


async def test_damage_in_rows_checked_less_than_a_day_ago_is_found_when_a_run_reads_them(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i:>40}") for i in range(3000)])
    config = make_config(store.url, db.url, {"items": {"sql": SQL, "key": ["id"]}})
    # Read and diffed row by row: the runs read every index row, the damaged one among them.
    config.path.write_text(config.path.read_text() + "hash_in_source = false\n")
    config = load_config(config.path)
    for _ in range(2):
        assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK
    index = config.state_dir / "index.db"
    with sqlite3.connect(index) as conn:
        (checked_at,) = conn.execute("SELECT at FROM checks WHERE name = 'full'").fetchone()
    assert time.time() - checked_at < FULL_CHECK_EVERY_S
    spoil_one_page(index)

    with pytest.raises(StateError) as raised:
        await agent.run_once(config, ["items"])

    message = str(raised.value)
    assert "\n" not in message
    assert "is damaged" in message and "aside" in message and "resync" in message


@pytest.mark.parametrize("damaged", ["index.db", "queue/data.db"])
async def test_an_emptied_state_file_is_found_and_resync_loses_nothing(
    damaged: str, tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(50)])
    config = make_config(store.url, db.url, {"items": {"sql": SQL, "key": ["id"]}},
                         batch_rows=10)  # fmt: skip
    assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK

    # Changes wait in the queue (the store was not reached) when the file loses its bytes.
    db.execute("UPDATE items SET name = 'changed' WHERE id < 25")
    await agent.run_once(config, ["items"], drain=False)
    path = config.state_dir / damaged
    path.write_bytes(b"")

    with pytest.raises(StateError) as raised:
        await agent.run_once(config, ["items"])
    message = str(raised.value)
    assert "is empty" in message and "aside" in message and "resync" in message

    # The documented recovery: move it aside, resync every table.
    aside = path.parent if damaged.startswith("queue") else path
    aside.rename(aside.with_name(aside.name + ".damaged"))
    await agent.mark_resync(config, ["items"])
    assert (await agent.run_once(config, ["items"])).exit_code == agent.EXIT_OK
    assert await store_rows(store, "items") == db.encoded_rows(SQL)
