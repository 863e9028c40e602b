"""The chaos lab: a real agent, a real store and a fault proxy as processes on loopback.

`Lab` owns one work folder with the agent's configs and state, the store's data, and the
source tables on PostgreSQL or MariaDB. It starts and kills its own processes (by their pid,
nothing else), changes the source, and audits the whole system after a trial:

- the store's rows equal the source's, per table (compared in canonical encoding);
- every table's batches at the store have the sequence numbers 1..N, once each, and N is the
  index's last committed sequence number;
- every batch the store applied is one the agent staged, with the same sequence number and
  number of changes, and no sequence number was staged under two batch ids;
- nothing is left pending, in flight or parked in the queue, nor in the index's outbox;
- `PRAGMA integrity_check` is ok on the index, the queue and the store database.

Every wait is bounded; the proxy stops by itself after the lab's lifetime.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from manta_async.diff import codec

ROOT = Path(__file__).resolve().parent.parent
PROXY_SCRIPT = ROOT / "tests" / "faultproxy.py"
AGENT = "chaos"
TOKEN = "chaos-token"
PG_URL = "postgresql://postgres@127.0.0.1:5432/manta_test"
MY_URL = "mysql://root@127.0.0.1:3306/manta_test"
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Exit:
    """How an agent process ended."""

    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL


class Child:
    """A process this lab started; stopped by its own pid only."""

    def __init__(self, process: asyncio.subprocess.Process, out: Path, err: Path) -> None:
        self.process = process
        self.out = out
        self.err = err
        self.started = time.monotonic()

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.running:
            os.kill(self.process.pid, sig)

    async def started_to(self, line: str, timeout_s: float = 30.0) -> None:
        """Wait until the process wrote `line` to its stderr, or ended, or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        for _ in range(int(timeout_s / 0.05) + 1):
            if not self.running or time.monotonic() > deadline or line in _text(self.err):
                return
            await asyncio.sleep(0.05)

    async def wait(self, timeout_s: float) -> Exit:
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.kill()
            await self.process.wait()
            raise RuntimeError(
                f"process {self.process.pid} did not end within {timeout_s:.0f}s; killed it "
                f"(stderr in {self.err})"
            ) from None
        code = self.process.returncode
        assert code is not None
        return Exit(code, _text(self.out), _text(self.err), time.monotonic() - self.started)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


async def spawn(args: list[str], logs: Path, env: dict[str, str] | None = None) -> Child:
    """Start a process with its output in two files named after `logs`."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out.open("wb") as out_file, err.open("wb") as err_file:
        process = await asyncio.create_subprocess_exec(
            *args, stdout=out_file, stderr=err_file, stdin=asyncio.subprocess.DEVNULL,
            env=env or os.environ.copy(),
        )  # fmt: skip
    return Child(process, out, err)


# --- the source ---------------------------------------------------------------------------


class Source:
    """A source database reached through its own driver, not through the extractors."""

    kind = ""
    url = ""

    async def open(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def execute(self, sql: str, *args: Any) -> None:
        raise NotImplementedError

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def kill_readers(self, table: str) -> int:
        """End every other session that is reading `table`; return how many."""
        raise NotImplementedError

    def delete_one(self, table: str, where: str) -> str:
        """SQL deleting one row matching `where` (a keyless table's copy)."""
        raise NotImplementedError

    async def encoded_rows(self, sql: str) -> list[bytes]:
        rows = await self.fetch(sql)
        return sorted(codec.dumps(codec.encode_row(row)) for row in rows)


class PostgresSource(Source):
    kind = "postgres"
    url = PG_URL

    async def open(self) -> None:
        import asyncpg

        admin = await asyncpg.connect(host="127.0.0.1", user="postgres", database="postgres")
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'manta_test'"):
                await admin.execute("CREATE DATABASE manta_test")
        finally:
            await admin.close()
        self.conn = await asyncpg.connect(PG_URL, server_settings={"TimeZone": "UTC"})

    async def close(self) -> None:
        await self.conn.close()

    async def execute(self, sql: str, *args: Any) -> None:
        await self.conn.execute(_numbered(sql), *args)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        await self.conn.executemany(_numbered(sql), rows)

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(record) for record in await self.conn.fetch(sql)]

    async def kill_readers(self, table: str) -> int:
        killed = await self.conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'manta-async' AND pid <> pg_backend_pid() "
            "AND query ILIKE $1",
            f"%{table}%",
        )
        return len(killed)

    def delete_one(self, table: str, where: str) -> str:
        return f"DELETE FROM {table} WHERE ctid = (SELECT ctid FROM {table} WHERE {where} LIMIT 1)"


def _numbered(sql: str) -> str:
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


class MariaSource(Source):
    kind = "mariadb"
    url = MY_URL

    async def open(self) -> None:
        import aiomysql

        self.conn = await aiomysql.connect(
            host="127.0.0.1", port=3306, user="root", password="", autocommit=True,
            charset="utf8mb4", init_command="SET time_zone = '+00:00'",
        )  # fmt: skip
        async with self.conn.cursor() as cur:
            await cur.execute("SHOW DATABASES LIKE 'manta_test'")
            if not await cur.fetchall():
                await cur.execute("CREATE DATABASE manta_test CHARACTER SET utf8mb4")
            await cur.execute("USE manta_test")

    async def close(self) -> None:
        self.conn.close()

    async def execute(self, sql: str, *args: Any) -> None:
        async with self.conn.cursor() as cur:
            await cur.execute(sql.replace("?", "%s"), args or None)

    async def executemany(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.cursor() as cur:
            await cur.executemany(sql.replace("?", "%s"), rows)

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql)
            rows = await cur.fetchall()
        return [tuple(bytes(v) if isinstance(v, bytearray) else v for v in r) for r in rows]

    async def kill_readers(self, table: str) -> int:
        found = await self.fetch(
            "SELECT id FROM information_schema.processlist WHERE id <> CONNECTION_ID() "
            f"AND db = 'manta_test' AND info LIKE 'SELECT %{table}%'"
        )
        for (pid,) in found:
            await self.execute(f"KILL {int(pid)}")
        return len(found)

    def delete_one(self, table: str, where: str) -> str:
        return f"DELETE FROM {table} WHERE {where} LIMIT 1"


def make_source(kind: str) -> Source:
    return PostgresSource() if kind == "postgres" else MariaSource()


# --- the tables and the mutator -------------------------------------------------------------


@dataclass(frozen=True)
class TableSpec:
    name: str
    create: str
    select: str
    key: list[str] | None


def table_specs(prefix: str) -> dict[str, TableSpec]:
    """The lab's tables: keyed with a unique column, keyless, wide rows, and a big one."""
    p = prefix
    return {
        "items": TableSpec(
            f"{p}_items",
            f"CREATE TABLE {p}_items (id INT PRIMARY KEY, code VARCHAR(40) NOT NULL UNIQUE, "
            "name VARCHAR(200), price DECIMAL(12,2))",
            f"SELECT id, code, name, price FROM {p}_items",
            ["id"],
        ),
        "tags": TableSpec(
            f"{p}_tags",
            f"CREATE TABLE {p}_tags (tag VARCHAR(40) NOT NULL, weight INT NOT NULL)",
            f"SELECT tag, weight FROM {p}_tags",
            None,
        ),
        "wide": TableSpec(
            f"{p}_wide",
            f"CREATE TABLE {p}_wide (id INT PRIMARY KEY, body TEXT NOT NULL)",
            f"SELECT id, body FROM {p}_wide",
            ["id"],
        ),
        "big": TableSpec(
            f"{p}_big",
            f"CREATE TABLE {p}_big (id INT PRIMARY KEY, v VARCHAR(500) NOT NULL)",
            f"SELECT id, v FROM {p}_big",
            ["id"],
        ),
    }


class Mutator:
    """Changes the source: inserts, updates, deletes, a row changed and changed back, keys
    moved, copies of keyless rows added and removed."""

    def __init__(self, source: Source, specs: dict[str, TableSpec], rng: random.Random) -> None:
        self.source = source
        self.specs = specs
        self.rng = rng
        self.ids: list[int] = []
        self.next_id = 1
        self.flipped: dict[int, str] = {}
        self.wide_rows = 0
        self.ops: Counter[str] = Counter()

    async def seed(self, items: int, tags: int, wide: int, big: int) -> None:
        s = self.specs
        for spec in s.values():
            await self.source.execute(spec.create)
        await self.source.executemany(
            f"INSERT INTO {s['items'].name} VALUES (?, ?, ?, ?)",
            [self._item(i) for i in range(1, items + 1)],
        )
        self.ids = list(range(1, items + 1))
        self.next_id = items + 1
        await self.source.executemany(
            f"INSERT INTO {s['tags'].name} VALUES (?, ?)",
            [(f"tag{self.rng.randrange(30)}", self.rng.randrange(3)) for _ in range(tags)],
        )
        self.wide_rows = wide
        await self.source.executemany(
            f"INSERT INTO {s['wide'].name} VALUES (?, ?)", [(i, "w" * 600) for i in range(wide)]
        )
        await self.source.executemany(
            f"INSERT INTO {s['big'].name} VALUES (?, ?)",
            # Long enough rows that the result outgrows the socket buffers: the server is
            # still sending when the harness ends the session.
            [(i, f"v{i}".ljust(400, ".")) for i in range(big)],
        )

    async def drop(self) -> None:
        for spec in self.specs.values():
            await self.source.execute(f"DROP TABLE IF EXISTS {spec.name}")

    def _item(self, i: int) -> tuple[Any, ...]:
        from decimal import Decimal

        return (i, f"c{i}-{uuid.uuid4().hex[:8]}", f"item {i}", Decimal(f"{i % 997}.{i % 100:02d}"))

    async def burst(self, n: int, *, deletes: bool = True) -> None:
        """Make `n` random changes."""
        ops = [self.insert, self.update, self.flip, self.move_key, self.add_tag]
        if deletes:
            ops += [self.delete, self.remove_tag]
        for _ in range(n):
            op = self.rng.choice(ops)
            await op()
            self.ops[op.__name__] += 1

    async def run_during(self, stop: asyncio.Event, pause_s: float = 0.02) -> None:
        """Keep changing the source until `stop` is set (bounded by 2,000 changes)."""
        for _ in range(2000):
            if stop.is_set():
                return
            await self.burst(1)
            await asyncio.sleep(self.rng.uniform(0, pause_s))

    async def insert(self) -> None:
        i = self.next_id
        self.next_id += 1
        await self.source.execute(f"INSERT INTO {self.specs['items'].name} VALUES (?, ?, ?, ?)",
                                  *self._item(i))  # fmt: skip
        self.ids.append(i)

    async def update(self) -> None:
        if self.ids:
            i = self.rng.choice(self.ids)
            name = f"item {i} v{self.rng.randrange(1000)}"
            await self.source.execute(
                f"UPDATE {self.specs['items'].name} SET name = ? WHERE id = ?", name, i
            )

    async def delete(self) -> None:
        if len(self.ids) > 200:
            i = self.ids.pop(self.rng.randrange(len(self.ids)))
            self.flipped.pop(i, None)
            await self.source.execute(f"DELETE FROM {self.specs['items'].name} WHERE id = ?", i)

    async def flip(self) -> None:
        # A row changed now and changed back by a later flip: the store must end as it began.
        table = self.specs["items"].name
        if self.flipped:
            i, name = self.flipped.popitem()
            await self.source.execute(f"UPDATE {table} SET name = ? WHERE id = ?", name, i)
            return
        if self.ids:
            i = self.rng.choice(self.ids)
            rows = await self.source.fetch(f"SELECT name FROM {table} WHERE id = {i}")
            self.flipped[i] = rows[0][0]
            await self.source.execute(f"UPDATE {table} SET name = 'flipped' WHERE id = ?", i)

    async def move_key(self) -> None:
        # Same row, same unique code, new id: a delete and an insert in one run.
        if self.ids:
            old = self.ids.pop(self.rng.randrange(len(self.ids)))
            new = self.next_id
            self.next_id += 1
            self.flipped.pop(old, None)
            await self.source.execute(
                f"UPDATE {self.specs['items'].name} SET id = ? WHERE id = ?", new, old
            )
            self.ids.append(new)

    async def add_tag(self) -> None:
        tag = f"tag{self.rng.randrange(30)}"
        await self.source.execute(
            f"INSERT INTO {self.specs['tags'].name} VALUES (?, ?)", tag, self.rng.randrange(3)
        )

    async def remove_tag(self) -> None:
        tag = f"tag{self.rng.randrange(30)}"
        await self.source.execute(self.source.delete_one(self.specs["tags"].name, f"tag = '{tag}'"))

    async def rewrite_wide(self) -> None:
        """Change every wide row: one large batch of updates."""
        body = uuid.uuid4().hex * 19
        await self.source.execute(f"UPDATE {self.specs['wide'].name} SET body = ?", body)


# --- findings ---------------------------------------------------------------------------------


@dataclass
class Findings:
    """What the audits found, summed over trials."""

    messages: Counter[str] = field(default_factory=Counter)
    """The error lines that full disks and damaged files produced."""
    trials: Counter[str] = field(default_factory=Counter)
    lost_changes: int = 0
    double_applied: int = 0
    seq_gaps: int = 0
    seq_repeats: int = 0
    unknown_batches: int = 0
    changes_mismatch: int = 0
    integrity_failures: int = 0
    left_in_queue: int = 0
    unverified: int = 0
    batches_applied: int = 0
    changes_applied: int = 0
    resent_refused: int = 0
    proxied_requests: int = 0
    network_batches: int = 0
    recovery_s: list[float] = field(default_factory=list)
    exit_codes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, trial: str, text: str) -> None:
        self.problems.append(f"{trial}: {text}")

    @property
    def bad(self) -> int:
        return (self.lost_changes + self.double_applied + self.seq_gaps + self.seq_repeats
                + self.unknown_batches + self.changes_mismatch + self.integrity_failures
                + self.left_in_queue + len(self.problems))  # fmt: skip


# --- the lab ----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Every batch the agent staged, read from its queue: batch id → (table, seq, changes).

    A new index starts every table's sequence again at 1 (the store takes the first part of a
    full resend whatever came before): `forget` then sets the earlier batches aside.
    """

    batches: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    last_pqid: int = 0
    forgotten: set[str] = field(default_factory=set)
    base: dict[str, int] = field(default_factory=dict)
    """Per table, the last sequence number before the index or queue was replaced, when the
    sequence goes on from it."""

    def forget(self, store: list[tuple[str, str, int, int, int]], committed: dict[str, int]
               ) -> None:  # fmt: skip
        """Set aside what was sent before a new index (`committed` empty) or a new queue
        (`committed` the index's last sequence numbers, which the lost queue may have held)."""
        self.forgotten.update(row[0] for row in store)
        self.batches.clear()
        self.base = dict(committed)
        if committed:
            self.last_pqid = 0


class Lab:
    """One source database, one store, one proxy, one agent state; see the module docstring."""

    def __init__(self, work: Path, kind: str, seed: int, *, lifetime_s: float) -> None:
        self.work = work
        self.kind = kind
        self.rng = random.Random(seed)
        self.lifetime_s = lifetime_s
        self.prefix = f"chaos_{uuid.uuid4().hex[:8]}"
        self.specs = table_specs(self.prefix)
        self.source = make_source(kind)
        self.mutator = Mutator(self.source, self.specs, self.rng)
        self.state_link = work / "state"
        self.store_dir = work / "store"
        self.store_port = free_port()
        self.proxy_port = free_port()
        self.store: Child | None = None
        self.proxy: Child | None = None
        self.children: list[Child] = []
        self.ledger = Ledger()
        self.reported: set[tuple[Any, ...]] = set()
        self.runs = 0

    @property
    def store_url(self) -> str:
        return f"http://127.0.0.1:{self.store_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def state_dir(self) -> Path:
        return self.state_link.resolve()

    async def __aenter__(self) -> Lab:
        (self.work / "state-disk").mkdir(parents=True, exist_ok=True)
        self.state_link.symlink_to(self.work / "state-disk")
        await self.source.open()
        await self.mutator.seed(items=300, tags=120, wide=2000, big=30000)
        self.write_configs()
        await self.start_store()
        await self.start_proxy()
        self._watch = asyncio.create_task(self._watch_queue())
        return self

    async def _watch_queue(self) -> None:
        # A drain clears acked batches but the latest few: read them while they are there.
        while True:
            await asyncio.sleep(0.03)
            self.read_ledger()

    async def __aexit__(self, *exc_info: object) -> None:
        self._watch.cancel()
        for child in self.children:
            child.kill()
            await child.process.wait()
        await self.mutator.drop()
        await self.source.close()

    # Configs

    def write_configs(self) -> None:
        main = ["items", "tags", "wide"]
        self.write_config("main", self.store_url, main, batch_rows=40, retry_for_s=3)
        self.write_config("large", self.proxy_url, main, batch_rows=5000, retry_for_s=8,
                          batch_bytes=8 * 1024 * 1024)  # fmt: skip
        self.write_config("proxy", self.proxy_url, main, batch_rows=5, retry_for_s=30,
                          timeout_s=1.0)  # fmt: skip
        self.write_config("big", self.store_url, ["big"], batch_rows=5000, retry_for_s=3,
                          chunk_rows=100)  # fmt: skip

    def write_config(self, name: str, url: str, tables: list[str], **keys: Any) -> Path:
        agent_keys = {k: keys.pop(k) for k in ("batch_rows", "batch_bytes", "chunk_rows")
                      if k in keys}  # fmt: skip
        agent_keys.setdefault("chunk_rows", 500)
        store_keys = {"token": TOKEN, "max_backoff_s": 0.3, "timeout_s": 10.0, **keys}
        # max_delete_share = 1: the mutator's bursts may delete most of a small table on purpose;
        # the guard has tests of its own (tests/test_mass_delete.py).
        lines = ["[agent]", f'name = "{AGENT}"', 'state_dir = "state"', 'log_level = "WARNING"',
                 "max_delete_share = 1"]  # fmt: skip
        lines += [f"{k} = {v!r}" for k, v in agent_keys.items()]
        lines += ["[store]", f'url = "{url}"'] + [f"{k} = {v!r}" for k, v in store_keys.items()]
        lines += ["[sources.db]", f'url = "{self.source.url}"']
        for table in tables:
            spec = self.specs[table]
            lines += [f"[tables.{spec.name}]", 'source = "db"', f"sql = {spec.select!r}"]
            if spec.key:
                lines.append(f"key = {spec.key!r}")
        path = self.work / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def config(self, name: str) -> Path:
        return self.work / f"{name}.toml"

    # Processes

    async def start_store(self) -> None:
        args = [sys.executable, "-m", "manta_async", "store", "--data", str(self.store_dir),
                "--port", str(self.store_port), "--token", TOKEN]  # fmt: skip
        self.store = await spawn(args, self.work / "store-log")
        self.children.append(self.store)
        await self._until_up(f"{self.store_url}/v1/health", self.store)

    def kill_store(self, sig: int = signal.SIGKILL) -> None:
        assert self.store is not None
        self.store.kill(sig)

    async def store_gone(self) -> None:
        assert self.store is not None
        await self.store.process.wait()
        self.children.remove(self.store)

    async def start_proxy(self) -> None:
        args = [sys.executable, str(PROXY_SCRIPT), "--port", str(self.proxy_port), "--upstream",
                self.store_url, "--lifetime", str(self.lifetime_s)]  # fmt: skip
        self.proxy = await spawn(args, self.work / "proxy-log")
        self.children.append(self.proxy)
        await self._until_up(f"{self.proxy_url}/_faults/log", self.proxy)

    async def _until_up(self, url: str, child: Child) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if not child.running:
                    raise RuntimeError(f"{url} exited at start: {_text(child.err)[-500:]}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{url} did not answer within {START_TIMEOUT_S:.0f}s")

    async def script(self, actions: list[str]) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{self.proxy_url}/_faults", json=actions) as response:
                response.raise_for_status()

    async def proxy_log(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{self.proxy_url}/_faults/log") as response:
                result: list[dict[str, Any]] = await response.json()
                return result

    async def agent(self, config: str, *args: str, crash_at: str | None = None) -> Child:
        """Start `manta-async -c CONFIG ARGS...` as its own process."""
        env = {k: v for k, v in os.environ.items() if k != "MANTA_CRASH_AT"}
        if crash_at:
            env["MANTA_CRASH_AT"] = crash_at
        self.runs += 1
        cmd = [sys.executable, "-m", "manta_async", "-c", str(self.config(config)), *args]
        child = await spawn(cmd, self.work / f"agent-{self.runs}", env)
        self.children.append(child)
        return child

    async def finish(self, child: Child, timeout_s: float = 120.0) -> Exit:
        """Wait for an agent process, forget it, and read what it staged."""
        try:
            return await child.wait(timeout_s)
        finally:
            self.children.remove(child)
            self.read_ledger()

    async def run_once(self, config: str = "main", *args: str, timeout_s: float = 120.0) -> Exit:
        return await self.run_cli(config, "run", "--once", *args, timeout_s=timeout_s)

    async def run_cli(self, config: str, *args: str, timeout_s: float = 120.0) -> Exit:
        child = await self.agent(config, *args)
        return await self.finish(child, timeout_s)

    # Reading the agent's and the store's files

    def read_ledger(self) -> None:
        path = self.state_dir / "queue" / "data.db"
        if not path.exists():
            return
        try:
            with _read_only(path) as db:
                rows = db.execute(
                    "SELECT _id, data FROM ack_queue_default WHERE _id > ? ORDER BY _id",
                    (self.ledger.last_pqid,),
                ).fetchall()
        except sqlite3.Error as exc:
            if os.environ.get("CHAOS_DEBUG"):
                print(f"ledger read failed: {exc}", file=sys.stderr)
            return  # a hot journal after a kill: read it after the next clean run
        for pqid, data in rows:
            batch = orjson.loads(data)
            self.ledger.batches.setdefault(batch["id"], (batch["table"], batch["seq"], -1))
            entry = self.ledger.batches[batch["id"]]
            self.ledger.batches[batch["id"]] = (entry[0], entry[1], len(batch["changes"]))
            self.ledger.last_pqid = pqid

    async def store_rows(self, table: str) -> list[bytes]:
        url = f"{self.store_url}/v1/agents/{AGENT}/tables/{table}/rows?format=ndjson"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(url) as response:
                if response.status == 404:
                    return []
                response.raise_for_status()
                body = await response.read()
        return sorted(codec.dumps(orjson.loads(line)) for line in body.splitlines() if line)

    def store_batches(self) -> list[tuple[str, str, int, int, int]]:
        """The store's batches since the agent's index last started afresh."""
        with _read_only(self.store_dir / "store.db") as db:
            rows = db.execute("SELECT id, tbl, seq, changes, resent FROM batches").fetchall()
        return [row for row in rows if row[0] not in self.ledger.forgotten]

    def new_index(self, new_queue: bool) -> None:
        """The index (or the queue) was replaced: sequences start again from here."""
        committed = self.index_seqs() if new_queue else {}
        committed.pop("(outbox)", None)
        self.ledger.forget(self.store_batches(), committed)

    def index_seqs(self) -> dict[str, int]:
        with _read_only(self.state_dir / "index.db") as db:
            found = db.execute("SELECT name, next_seq - 1 FROM tables").fetchall()
            outbox = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
        seqs = dict(found)
        seqs["(outbox)"] = outbox
        return seqs

    def queued_seqs(self, table: str) -> list[int]:
        """Sequence numbers of the table's batches not yet acked, in queue order."""
        with _read_only(self.state_dir / "queue" / "data.db") as db:
            rows = db.execute(
                "SELECT data FROM ack_queue_default WHERE status != 5 ORDER BY _id"
            ).fetchall()
        batches = [orjson.loads(data) for (data,) in rows]
        return [b["seq"] for b in batches if b["table"] == table]

    def index_ahead_of_queue(self) -> bool:
        """True if the index committed a sequence number that is nowhere durable: not in the
        outbox, not in the queue, not at the store."""
        durable: dict[str, int] = {}
        for _id, table, seq, _changes, _resent in self.store_batches():
            durable[table] = max(durable.get(table, 0), seq)
        for table, seq, _changes in self.ledger.batches.values():
            durable[table] = max(durable.get(table, 0), seq)
        with _read_only(self.state_dir / "index.db") as db:
            committed = db.execute("SELECT name, next_seq - 1 FROM tables").fetchall()
            for table, seq in db.execute("SELECT tbl, seq FROM outbox WHERE seq IS NOT NULL"):
                durable[table] = max(durable.get(table, 0), seq)
        return any(seq > durable.get(table, 0) for table, seq in committed)

    def check_batches(self) -> BatchReport:
        """Compare the store's batches with the index and with what the agent staged."""
        report = BatchReport()
        seqs: dict[str, list[int]] = {}
        for batch_id, table, seq, changes, resent in self.store_batches():
            seqs.setdefault(table, []).append(seq)
            report.totals = (report.totals[0] + 1, report.totals[1] + changes,
                             report.totals[2] + resent)  # fmt: skip
            staged = self.ledger.batches.get(batch_id)
            if staged is None:
                report.unverified += 1
            elif staged != (table, seq, changes):
                report.count(self.reported, ("mismatch", batch_id), f"batch {batch_id}: store "
                             f"has {(table, seq, changes)}, agent staged {staged}")  # fmt: skip
        self._check_seqs(report, seqs)
        self._check_staged_once(report)
        left = self.queue_left() + self.index_seqs()["(outbox)"]
        if left:
            report.left += left
            report.notes.append(f"{left} batches left in the queue or outbox after recovery")
        return report

    def _check_seqs(self, report: BatchReport, seqs: dict[str, list[int]]) -> None:
        committed = self.index_seqs()
        for table in set(seqs) | {t for t in committed if t != "(outbox)"}:
            found = Counter(seqs.get(table, []))
            top = max([committed.get(table, 0), *found])
            for seq in range(self.ledger.base.get(table, 0) + 1, top + 1):
                if found[seq] == 0:
                    report.count(self.reported, ("gap", table, seq),
                                 f"{table}: seq {seq} is missing at the store")  # fmt: skip
                elif found[seq] > 1:
                    report.count(self.reported, ("repeat", table, seq),
                                 f"{table}: seq {seq} applied {found[seq]} times")  # fmt: skip

    def _check_staged_once(self, report: BatchReport) -> None:
        ids: dict[tuple[str, int], set[str]] = {}
        for batch_id, (table, seq, _changes) in self.ledger.batches.items():
            ids.setdefault((table, seq), set()).add(batch_id)
        for (table, seq), found in ids.items():
            if len(found) > 1:
                report.count(self.reported, ("double", table, seq),
                             f"{table}: seq {seq} staged as {len(found)} batches")  # fmt: skip

    def queue_left(self) -> int:
        path = self.state_dir / "queue" / "data.db"
        if not path.exists():
            return 0
        with _read_only(path) as db:
            left: int = db.execute(
                "SELECT count(*) FROM ack_queue_default WHERE status != 5"
            ).fetchone()[0]
            return left


@dataclass
class BatchReport:
    """What one look at the batches found; each fault is counted once, when first seen."""

    gaps: int = 0
    repeats: int = 0
    double_applied: int = 0
    unknown: int = 0
    mismatched: int = 0
    left: int = 0
    unverified: int = 0
    """Batches at the store that the queue no longer held when the lab looked."""
    totals: tuple[int, int, int] = (0, 0, 0)
    """Batches applied, changes applied, resends refused as duplicates."""
    notes: list[str] = field(default_factory=list)

    def count(self, seen: set[tuple[Any, ...]], fault: tuple[Any, ...], note: str) -> None:
        if fault in seen:
            return
        seen.add(fault)
        kind = {"gap": "gaps", "repeat": "repeats", "double": "double_applied",
                "unknown": "unknown", "mismatch": "mismatched"}[fault[0]]  # fmt: skip
        setattr(self, kind, getattr(self, kind) + 1)
        self.notes.append(note)


class _read_only:
    """A read-only SQLite connection that is closed on exit (sqlite3's own does not)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc_info: object) -> None:
        self.conn.close()


def integrity(path: Path) -> str:
    """`PRAGMA integrity_check` of one SQLite file ("ok" when sound)."""
    if not path.exists():
        return "ok"
    try:
        with _read_only(path) as db:
            result: str = db.execute("PRAGMA integrity_check").fetchone()[0]
            return result
    except sqlite3.Error as exc:
        return str(exc)
