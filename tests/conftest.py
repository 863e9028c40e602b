"""Shared fixtures: real PostgreSQL and MariaDB databases, a real store on loopback.

The PostgreSQL and MariaDB servers are the ones on 127.0.0.1 (see README). When one is
unreachable its tests skip with the reason; with CI=true or MANTA_REQUIRE_SERVICES=1 in the
environment, the skip becomes a failure, so a CI run can never pass without them.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from manta_async.config import Config, parse_config
from manta_async.store import StoreServer

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres", database="test")
MY_ADMIN = dict(host="127.0.0.1", port=3306, user="root", password="")
TEST_DB = "manta_test"
TOKEN = "test-token"


def services_required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or bool(
        os.environ.get("MANTA_REQUIRE_SERVICES")
    )


def unavailable(reason: str) -> None:
    """Skip the test, or fail it where the services are required."""
    if services_required():
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A PostgreSQL database for the tests, created if missing."""
    if not _port_open("127.0.0.1", 5432):
        unavailable("PostgreSQL is not listening on 127.0.0.1:5432")
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(**PG_ADMIN)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", TEST_DB)
            if not exists:
                await conn.execute(f"CREATE DATABASE {TEST_DB}")
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql://postgres@127.0.0.1:5432/{TEST_DB}"


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """A MariaDB database for the tests, created if missing."""
    if not _port_open("127.0.0.1", 3306):
        unavailable("MariaDB is not listening on 127.0.0.1:3306")
    import pymysql

    conn = pymysql.connect(**MY_ADMIN)
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {TEST_DB} CHARACTER SET utf8mb4")
    finally:
        conn.close()
    return f"mysql://root@127.0.0.1:3306/{TEST_DB}"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreServer]:
    """A real store on a free loopback port, with its data in the test's folder."""
    async with StoreServer(tmp_path / "store", token=TOKEN) as server:
        yield server


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


MakeConfig = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """Build a Config for one source and some tables, written to the test's folder."""

    def make(
        store_url: str,
        source_url: str,
        tables: dict[str, dict[str, Any]],
        store: dict[str, Any] | None = None,
        **agent: Any,
    ) -> Config:
        store_keys = {"token": TOKEN, "retry_for_s": 2, "max_backoff_s": 0.5, **(store or {})}
        lines = ["[agent]", 'name = "test-agent"', 'state_dir = "state"']
        lines += [f"{k} = {v!r}" for k, v in agent.items()]
        lines += ["[store]", f'url = "{store_url}"']
        lines += [f"{k} = {v!r}" for k, v in store_keys.items()]
        lines += ["[sources.db]", f'url = "{source_url}"']
        for name, spec in tables.items():
            lines += [f"[tables.{name}]", 'source = "db"', f"sql = {spec['sql']!r}"]
            if spec.get("key") is not None:
                lines.append(f"key = {spec['key']!r}")
        path = tmp_path / "manta.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return parse_config(path.read_text(encoding="utf-8"), path)

    return make
