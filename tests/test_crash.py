"""Killed at any step, the agent neither loses a change nor lets the store apply one twice.

Each case runs the agent as a real process and SIGKILLs it at a named point (see
manta_async/faults.py), changes the source again, runs the agent to completion, and audits
the store: its rows equal the source's, every table's batches have the sequence numbers
1..N once each, and the number of changes applied is exactly what the committed runs made.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from manta_async.config import Config
from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT id, name, price FROM items"


async def run_agent(config: Config, crash_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MANTA_CRASH_AT"}
    if crash_at:
        env["MANTA_CRASH_AT"] = crash_at
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manta_async", "-c", str(config.path), "run", "--once",
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    if crash_at is None:
        assert process.returncode == 0, stderr.decode()
    return process.returncode


def audit(store_dir: Path) -> tuple[int, int]:
    """Check every table's sequence numbers; return (batches, changes) applied."""
    with sqlite3.connect(f"file:{store_dir / 'store.db'}?mode=ro", uri=True) as db:
        per_table = db.execute(
            "SELECT tbl, count(*), count(DISTINCT seq), min(seq), max(seq), sum(changes) "
            "FROM batches GROUP BY tbl"
        ).fetchall()
        resent = db.execute("SELECT coalesce(sum(resent), 0) FROM batches").fetchone()[0]
    batches = changes = 0
    for table, count, distinct, low, high, applied in per_table:
        assert count == distinct == high and low == 1, f"{table}: seqs not 1..N once each"
        batches += count
        changes += applied
    assert resent >= 0
    return batches, changes


@pytest.mark.parametrize(
    "crash_at",
    ["fetched", "index-committed", "queued", "queued:2", "uploaded", "uploaded:3",
     "acked", "acked:2"],
)  # fmt: skip
async def test_killed_run_then_change_back_leaves_store_equal(
    crash_at: str, tmp_path: Path, make_config: MakeConfig, unused_tcp_port: int
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price TEXT)")
    db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                   [(i, f"item {i}", f"{i}.00") for i in range(1, 31)])  # fmt: skip
    url = f"http://127.0.0.1:{unused_tcp_port}"
    config = make_config(url, db.url, {"items": {"sql": SQL, "key": ["id"]}},
                         chunk_rows=7, batch_rows=4)  # fmt: skip

    async with StoreServer(tmp_path / "store", token="test-token", port=unused_tcp_port) as store:
        await run_agent(config)
        first_batches, first_changes = audit(tmp_path / "store")
        assert first_changes == 30

        # Row 1 changes, among 17 other changes; the run is killed part way.
        db.execute("UPDATE items SET name = name || ' v2' WHERE id <= 10")
        db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                       [(i, f"item {i}", "0.50") for i in range(31, 36)])  # fmt: skip
        db.execute("DELETE FROM items WHERE id IN (20, 21, 22)")
        code = await run_agent(config, crash_at)
        assert code == -signal.SIGKILL, f"the agent was not killed at {crash_at} ({code})"

        # Row 1 changes back to its first value; the next run must still converge.
        db.execute("UPDATE items SET name = 'item 1' WHERE id = 1")
        await run_agent(config)

        assert await store_rows(store, "items") == db.encoded_rows(SQL)
        _batches, changes = audit(tmp_path / "store")
        committed_before_kill = crash_at != "fetched"
        # 18 changes (10 updates, 5 inserts, 3 deletes) then row 1 back: 19 in all; killed
        # before its commit, the interrupted run left nothing and the next sees 17 (row 1
        # is as it was).
        assert changes - first_changes == (19 if committed_before_kill else 17)
