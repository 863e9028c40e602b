"""The mass-delete guard: a run that would delete more than max_delete_share of a table's rows
stops that table until the deletes are confirmed; the other tables still run.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from manta_async import agent
from manta_async.config import Config, parse_config
from manta_async.errors import ConfigError
from manta_async.store import StoreServer
from tests.conftest import TOKEN
from tests.dbs import SqliteDb
from tests.test_sync import store_rows

SQL = "SELECT id, name FROM {t}"


@pytest.fixture
def source(tmp_path: Path) -> SqliteDb:
    db = SqliteDb(tmp_path / "source.db")
    for table, rows in (("big", 20), ("small", 8), ("other", 20)):
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT)")
        db.executemany(f"INSERT INTO {table} VALUES (?, ?)",
                       [(i, f"{table} {i}") for i in range(rows)])  # fmt: skip
    return db


def write_config(tmp_path: Path, store_url: str, db: SqliteDb, agent_share: str = "",
                 big_share: str = "") -> Config:  # fmt: skip
    lines = ["[agent]", 'name = "test-agent"', 'state_dir = "state"']
    lines += [f"max_delete_share = {agent_share}"] if agent_share else []
    lines += ["[store]", f'url = "{store_url}"', f'token = "{TOKEN}"', "retry_for_s = 2"]
    lines += ["[sources.db]", f'url = "{db.url}"']
    for table in ("big", "small", "other"):
        lines += [f"[tables.{table}]", 'source = "db"', f'sql = "{SQL.format(t=table)}"',
                  'key = ["id"]']  # fmt: skip
        if table == "big" and big_share:
            lines.append(f"max_delete_share = {big_share}")
    path = tmp_path / "manta.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return parse_config(path.read_text(encoding="utf-8"), path)


def error_of(report: agent.RunReport, table: str) -> str | None:
    assert report.sync is not None
    return next(o.error for o in report.sync.tables if o.table == table)


async def test_deleting_most_rows_stops_the_table_until_confirmed(
    tmp_path: Path, source: SqliteDb, store: StoreServer
) -> None:
    config = write_config(tmp_path, store.url, source)
    assert (await agent.run_once(config, ["big", "other"])).exit_code == agent.EXIT_OK

    # 15 of 20 rows gone: held back, with the numbers and the way to confirm.
    source.execute("DELETE FROM big WHERE id >= 5")
    source.execute("UPDATE other SET name = 'changed' WHERE id = 1")
    report = await agent.run_once(config, ["big", "other"])
    assert report.exit_code == agent.EXIT_TABLE_FAILED
    error = error_of(report, "big") or ""
    assert "would delete 15 of its 20 rows (75%)" in error
    assert "max_delete_share = 0.5" in error and "--allow-mass-delete --table big" in error
    assert error_of(report, "other") is None
    assert len(await store_rows(store, "big")) == 20
    assert await store_rows(store, "other") == source.encoded_rows(SQL.format(t="other"))

    # Nothing moved in the index: the next plain run is held back the same way.
    assert (await agent.run_once(config, ["big"])).exit_code == agent.EXIT_TABLE_FAILED

    report = await agent.run_once(config, ["big"], allow_mass_delete=True)
    assert report.exit_code == agent.EXIT_OK
    assert await store_rows(store, "big") == source.encoded_rows(SQL.format(t="big"))


async def test_a_truncated_table_syncs_once_confirmed(
    tmp_path: Path, source: SqliteDb, store: StoreServer
) -> None:
    config = write_config(tmp_path, store.url, source)
    await agent.run_once(config, ["big"])

    source.execute("DELETE FROM big")
    report = await agent.run_once(config, ["big"])
    assert "would delete 20 of its 20 rows (100%)" in (error_of(report, "big") or "")

    report = await agent.run_once(config, ["big"], allow_mass_delete=True)
    assert report.exit_code == agent.EXIT_OK
    assert await store_rows(store, "big") == []


async def test_half_or_less_and_small_tables_pass(
    tmp_path: Path, source: SqliteDb, store: StoreServer
) -> None:
    config = write_config(tmp_path, store.url, source)
    await agent.run_once(config, ["big", "small"])

    # Exactly half of big, and every row of a table under 10 rows, need no confirmation.
    source.execute("DELETE FROM big WHERE id >= 10")
    source.execute("DELETE FROM small")
    report = await agent.run_once(config, ["big", "small"])

    assert report.exit_code == agent.EXIT_OK
    assert len(await store_rows(store, "big")) == 10
    assert await store_rows(store, "small") == []


@pytest.mark.parametrize(("agent_share", "big_share"), [("0.9", ""), ("0.1", "1")])
async def test_the_share_is_set_for_the_agent_or_per_table(
    agent_share: str, big_share: str, tmp_path: Path, source: SqliteDb, store: StoreServer
) -> None:
    config = write_config(tmp_path, store.url, source, agent_share, big_share)
    await agent.run_once(config, ["big"])

    source.execute("DELETE FROM big WHERE id >= 5")
    report = await agent.run_once(config, ["big"])

    assert report.exit_code == agent.EXIT_OK
    assert len(await store_rows(store, "big")) == 5


def test_a_share_outside_0_to_1_is_refused(tmp_path: Path, source: SqliteDb) -> None:
    with pytest.raises(ConfigError, match=r"agent.max_delete_share: .*less than or equal to 1"):
        write_config(tmp_path, "http://127.0.0.1:1", source, agent_share="1.5")
    with pytest.raises(ConfigError, match=r"tables.big.max_delete_share: .*greater than or eq"):
        write_config(tmp_path, "http://127.0.0.1:1", source, big_share="-0.1")


async def cli_run(config: Config, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "manta_async", "-c", str(config.path), "run", "--once", *args,
        env=os.environ.copy(), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_the_command_line_holds_back_then_confirms(
    tmp_path: Path, source: SqliteDb, store: StoreServer
) -> None:
    config = write_config(tmp_path, store.url, source)
    assert (await cli_run(config, "--table", "big"))[0] == agent.EXIT_OK
    source.execute("DELETE FROM big WHERE id >= 2")

    code, stderr = await cli_run(config, "--table", "big")
    assert code == agent.EXIT_TABLE_FAILED
    assert "would delete 18 of its 20 rows" in stderr and "Traceback" not in stderr

    code, stderr = await cli_run(config, "--table", "big", "--allow-mass-delete")
    assert code == agent.EXIT_OK, stderr
    assert len(await store_rows(store, "big")) == 2
