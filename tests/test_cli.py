"""The command line as a user meets it: demo, check, sql, queue, exit codes and messages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from manta_async.store import StoreServer
from tests.conftest import MakeConfig
from tests.dbs import SqliteDb


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "manta_async", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "160"},
    )  # fmt: skip


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    """`cli` for async tests, whose store must keep answering while the command runs."""
    return await asyncio.to_thread(cli, *args)


def test_demo_shows_the_copies_equal(tmp_path: Path) -> None:
    result = cli("demo", "--dir", str(tmp_path / "demo"))

    assert result.returncode == 0, result.stderr
    assert "the store equals the source" in result.stdout
    assert result.stdout.count(": equal") == 3
    assert (tmp_path / "demo" / "manta.toml").exists()


async def test_check_sql_and_queue_on_a_config(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, price TEXT, photo BLOB)")
    rows = [(i, f"{i}.50", b"\x00\xff") for i in range(9)]
    db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
    config = make_config(store.url, db.url, {"t": {"sql": "SELECT * FROM t", "key": ["id"]}})
    path = str(config.path)

    check = await acli("-c", path, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok   table t: 3 columns" in check.stdout and "all checks passed" in check.stdout

    sql = await acli("-c", path, "sql", "t", "--limit", "2")
    assert sql.returncode == 0, sql.stderr
    assert "2.50" not in sql.stdout and "1.50" in sql.stdout and "AP8=" in sql.stdout

    staged = await acli("-c", path, "run", "--once", "--no-upload")
    assert staged.returncode == 3, staged.stderr
    status = await acli("-c", path, "queue", "status")
    assert status.returncode == 0
    line = next(row for row in status.stdout.splitlines() if "│ t " in row)
    assert line.split("│")[2].strip() == "1"

    delivered = await acli("-c", path, "run", "--once")
    assert delivered.returncode == 0, delivered.stderr
    assert "delivered 1 batches" in delivered.stdout
    assert "the queue is empty" in (await acli("-c", path, "queue", "status")).stdout


def test_wrong_key_and_unknown_table_are_named(tmp_path: Path, make_config: MakeConfig) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    config = make_config("http://127.0.0.1:9", db.url,
                         {"t": {"sql": "SELECT * FROM t", "key": ["sku"]}})  # fmt: skip

    unknown = cli("-c", str(config.path), "run", "--once", "--table", "nope")
    assert unknown.returncode == 2
    assert "no table 'nope'" in unknown.stderr and "(tables: t)" in unknown.stderr

    run = cli("-c", str(config.path), "run", "--once")
    assert run.returncode == 5
    assert "key column(s) sku are not in the SELECT's result (columns: id)" in run.stderr


def test_missing_config_is_one_red_line(tmp_path: Path) -> None:
    result = cli("-c", str(tmp_path / "absent.toml"), "check")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "no such config file" in result.stderr
    assert "Traceback" not in result.stderr
