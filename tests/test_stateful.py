"""A stateful property test: any mix of source changes, runs, faulty uploads, crashes and a
store that goes away ends, after one clean run, with the store equal to the source.

Hypothesis draws the steps; the agent and the store are real processes, with the fault proxy
(tests/faultproxy.py) between them. After every recovery the store's rows must equal the
source's, every table's batches must carry the sequence numbers 1..N once each, and N must be
the index's last committed number. The source is SQLite; one variant runs on PostgreSQL.

Short by default; for the figures in docs/reliability.md set MANTA_STATEFUL_EXAMPLES (and
MANTA_STATEFUL_STEPS) higher, for example 200 and 30.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from manta_async.diff import codec
from tests.dbs import PostgresDb, SourceDb, SqliteDb

TOKEN = "stateful-token"
PROXY = Path(__file__).with_name("faultproxy.py")
EXAMPLES = int(os.environ.get("MANTA_STATEFUL_EXAMPLES", "3"))
STEPS = int(os.environ.get("MANTA_STATEFUL_STEPS", "12"))
CRASH_POINTS = ["fetched", "index-committed", "queued", "uploaded", "acked"]
FAULTS = ["pass", "status:500", "status:503", "reset-before", "reset-after", "cut-after",
          "delay:1.5", "retry-after:429:1"]  # fmt: skip
RUN_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http(method: str, url: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        data: bytes = response.read()
        return data


def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{url}: the process exited at start"
        try:
            http("GET", url)
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within 20s")


class Processes:
    """The store and the proxy of one example, started and stopped by their pids."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.store_port = free_port()
        self.proxy_port = free_port()
        self.store: subprocess.Popen[bytes] | None = None
        self.proxy: subprocess.Popen[bytes] | None = None

    @property
    def store_url(self) -> str:
        return f"http://127.0.0.1:{self.store_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start_store(self) -> None:
        self.store = subprocess.Popen(
            [sys.executable, "-m", "manta_async", "store", "--data", str(self.work / "store"),
             "--port", str(self.store_port), "--token", TOKEN],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_up(f"{self.store_url}/v1/health", self.store)

    def stop_store(self) -> None:
        if self.store is not None:
            self.store.send_signal(signal.SIGKILL)
            self.store.wait(timeout=30)
            self.store = None

    def start_proxy(self) -> None:
        self.proxy = subprocess.Popen(
            [sys.executable, str(PROXY), "--port", str(self.proxy_port), "--upstream",
             self.store_url, "--lifetime", "900"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until_up(f"{self.proxy_url}/_faults/log", self.proxy)

    def script(self, actions: list[str]) -> None:
        http("POST", f"{self.proxy_url}/_faults", orjson.dumps(actions))

    def close(self) -> None:
        self.stop_store()
        if self.proxy is not None:
            self.proxy.send_signal(signal.SIGKILL)
            self.proxy.wait(timeout=30)


class Source:
    """The source table, keyed by id, changed through the database's own driver."""

    def __init__(self, db: SourceDb, table: str) -> None:
        self.db = db
        self.table = table
        self.mark = "$" if db.kind == "postgres" else "?"
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")

    def sql(self, text: str) -> str:
        if self.mark == "?":
            return text
        parts = text.split("?")
        return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))

    def upsert(self, key: int, value: str) -> None:
        self.db.execute(self.sql(f"DELETE FROM {self.table} WHERE id = ?"), (key,))
        self.db.execute(self.sql(f"INSERT INTO {self.table} VALUES (?, ?)"), (key, value))

    def delete(self, key: int) -> None:
        self.db.execute(self.sql(f"DELETE FROM {self.table} WHERE id = ?"), (key,))

    def move(self, old: int, new: int) -> None:
        self.db.execute(f"DELETE FROM {self.table} WHERE id = {new}")
        self.db.execute(self.sql(f"UPDATE {self.table} SET id = ? WHERE id = ?"), (new, old))

    def rows(self) -> list[bytes]:
        return self.db.encoded_rows(f"SELECT id, v FROM {self.table}")

    def drop(self) -> None:
        self.db.execute(f"DROP TABLE IF EXISTS {self.table}")


def write_config(path: Path, store_url: str, source: Source, retry_for_s: float) -> Path:
    # max_delete_share = 1: the steps may delete most rows between two runs, on purpose.
    path.write_text(
        "\n".join([
            "[agent]", 'name = "stateful"', 'state_dir = "state"', "batch_rows = 3",
            "chunk_rows = 4", "max_delete_share = 1", 'log_level = "ERROR"',
            "[store]", f'url = "{store_url}"', f'token = "{TOKEN}"', "timeout_s = 1.0",
            f"retry_for_s = {retry_for_s}", "max_backoff_s = 0.2",
            "[sources.db]", f'url = "{source.db.url}"',
            f"[tables.{source.table}]", 'source = "db"',
            f'sql = "SELECT id, v FROM {source.table}"', 'key = ["id"]',
        ]) + "\n",
        encoding="utf-8",
    )  # fmt: skip
    return path


class DeliveryMachine(RuleBasedStateMachine):
    """Steps on one source table, one agent state, one store; see the module docstring."""

    make_db: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.work = Path(os.environ["MANTA_STATEFUL_TMP"]) / uuid.uuid4().hex[:10]
        self.work.mkdir(parents=True)
        self.source = Source(type(self).make_db(self.work), f"st_{uuid.uuid4().hex[:8]}")
        self.procs = Processes(self.work)
        self.procs.start_store()
        self.procs.start_proxy()
        work, source = self.work, self.source
        self.proxied = write_config(work / "proxied.toml", self.procs.proxy_url, source, 6)
        self.direct = write_config(work / "direct.toml", self.procs.store_url, source, 1.5)
        self.codes: Counter[str] = Counter()

    def agent(self, config: Path, crash_at: str | None = None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MANTA_CRASH_AT"}
        if crash_at:
            env["MANTA_CRASH_AT"] = crash_at
        done = subprocess.run(
            [sys.executable, "-m", "manta_async", "-c", str(config), "run", "--once"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        assert b"Traceback" not in done.stderr, done.stderr.decode()
        return done.returncode

    # Source changes

    @rule(key=st.integers(1, 25), value=st.text(max_size=12))
    def upsert(self, key: int, value: str) -> None:
        self.source.upsert(key, value)

    @rule(key=st.integers(1, 25))
    def delete(self, key: int) -> None:
        self.source.delete(key)

    @rule(old=st.integers(1, 25), new=st.integers(26, 40))
    def move_key(self, old: int, new: int) -> None:
        self.source.move(old, new)

    # Runs

    @rule()
    def run(self) -> None:
        self.codes[f"run:{self.agent(self.proxied)}"] += 1

    @rule(actions=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=6))
    def run_through_faults(self, actions: list[str]) -> None:
        self.procs.script(actions)
        code = self.agent(self.proxied)
        self.procs.script([])
        assert code in (0, 3), f"exit {code} through {actions}"

    @rule(point=st.sampled_from(CRASH_POINTS), nth=st.integers(1, 3))
    def crash(self, point: str, nth: int) -> None:
        code = self.agent(self.proxied, crash_at=f"{point}:{nth}")
        self.codes[f"crash {point}:{code}"] += 1

    @rule()
    def run_with_store_down(self) -> None:
        self.procs.stop_store()
        try:
            # 3: batches wait for the store; 0: there was nothing to send.
            assert self.agent(self.direct) in (0, 3)
        finally:
            self.procs.start_store()

    @rule()
    def recover_and_compare(self) -> None:
        self.check_after_recovery()

    def check_after_recovery(self) -> None:
        self.procs.script([])
        assert self.agent(self.direct) == 0
        assert self.store_rows() == self.source.rows()
        self.check_sequences()

    @invariant()
    def store_is_up(self) -> None:
        assert self.procs.store is not None and self.procs.store.poll() is None

    def store_rows(self) -> list[bytes]:
        url = f"{self.procs.store_url}/v1/agents/stateful/tables/{self.source.table}/rows"
        try:
            body = http("GET", url)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
        return sorted(codec.dumps(orjson.loads(line)) for line in body.splitlines() if line)

    def check_sequences(self) -> None:
        with sqlite3.connect(f"file:{self.work / 'store' / 'store.db'}?mode=ro", uri=True) as db:
            seqs = [s for (s,) in db.execute("SELECT seq FROM batches ORDER BY seq")]
        db.close()
        with sqlite3.connect(f"file:{self.work / 'state' / 'index.db'}?mode=ro", uri=True) as ix:
            found = ix.execute("SELECT next_seq - 1 FROM tables").fetchone()
        ix.close()
        committed = found[0] if found else 0
        assert seqs == list(range(1, committed + 1)), f"store seqs {seqs}, index {committed}"

    def teardown(self) -> None:
        try:
            self.check_after_recovery()
        finally:
            self.procs.close()
            self.source.drop()


def machine_for(make_db: Any) -> type[DeliveryMachine]:
    return type("Machine", (DeliveryMachine,), {"make_db": staticmethod(make_db)})


def run_machine(machine: type[DeliveryMachine], examples: int, tmp_path: Path) -> None:
    os.environ["MANTA_STATEFUL_TMP"] = str(tmp_path)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=EXAMPLES <= 3,
        ),
    )


def test_store_equals_sqlite_source_after_any_faults(tmp_path: Path) -> None:
    run_machine(machine_for(lambda work: SqliteDb(work / "source.db")), EXAMPLES, tmp_path)


def test_store_equals_postgres_source_after_any_faults(tmp_path: Path, pg_url: str) -> None:
    run_machine(machine_for(lambda work: PostgresDb(pg_url)), max(1, EXAMPLES // 3), tmp_path)


@pytest.fixture(autouse=True)
def _no_leftover_env() -> Any:
    yield
    os.environ.pop("MANTA_STATEFUL_TMP", None)
