"""Peak memory of the agent on a large table: reads stream, so the agent's RSS stays bounded.

    python bench/stream_memory.py --rows 5000000 --db postgres,mariadb
    python bench/stream_memory.py --rows 200000 --db postgres --max-rss-mb 150

For each database the script makes a table of --rows rows of about 200 bytes each (as the
wire carries them: a bigint key, a 100-character name, a decimal(12,2), a timestamp and a
32-character note) with the server's own row generator, starts a real store as a process on
loopback, and runs `manta-async run --once` as a process of its own three times:

- first      every row is sent, up to the store having applied it;
- unchanged  nothing changed; the database sums its row hashes, few rows are read;
- streamed   nothing changed, hash_in_source = false: every row is read and hashed here.

Each run's peak resident memory is the kernel's ru_maxrss for that process alone (os.wait4).
With --max-rss-mb the script exits 1 when a run went above it. The servers are the ones on
127.0.0.1 the tests use (PostgreSQL user postgres, MariaDB user root); the table lives in a
database manta_bench and is dropped at the end, as are the store's and the agent's files.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "stream-memory-token"
TABLE = f"stream_memory_{os.getpid()}"
SQL = f"SELECT id, name, amount, at, note FROM {TABLE}"
URLS = {
    "postgres": "postgresql://postgres@127.0.0.1:5432/manta_bench",
    "mariadb": "mysql://root@127.0.0.1:3306/manta_bench",
}
START_TIMEOUT_S = 20.0

# The row generators: a name of about 100 characters and a note of 32, so that a row's wire
# form ([1, "customer 1 ...", {"$dec": ...}, {"$ts": ...}, "..."]) is about 200 bytes.
PG_FILL = f"""
INSERT INTO {TABLE}
SELECT g, 'customer ' || g || ' ' || repeat(md5(g::text), 3), (g % 1000000) / 100.0,
       timestamp '2024-01-01' + g * interval '1 second', md5((g * 7)::text)
FROM generate_series(1, $1::bigint) AS g
"""
MY_FILL = f"""
INSERT INTO {TABLE}
SELECT seq, CONCAT('customer ', seq, ' ', REPEAT(MD5(seq), 3)), (seq % 1000000) / 100,
       TIMESTAMP '2024-01-01 00:00:00' + INTERVAL seq SECOND, MD5(seq * 7)
FROM seq_1_to_{{rows}}
"""
CREATE = f"""CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name varchar(200),
    amount decimal(12,2), at timestamp NULL, note varchar(40))"""


@dataclass
class Step:
    name: str
    seconds: float
    peak_mb: float
    exit_code: int


# --- the source tables ------------------------------------------------------------------------


async def make_pg_table(rows: int) -> None:
    import asyncpg

    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'manta_bench'"):
            await admin.execute("CREATE DATABASE manta_bench")
    finally:
        await admin.close()

    conn = await asyncpg.connect(URLS["postgres"])
    try:
        await conn.execute(CREATE)
        await conn.execute(PG_FILL, rows)
        await conn.execute(f"ANALYZE {TABLE}")
    finally:
        await conn.close()


def make_my_table(rows: int) -> None:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="")
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS manta_bench CHARACTER SET utf8mb4")
            cur.execute("USE manta_bench")
            cur.execute("SET SESSION time_zone = '+00:00'")
            cur.execute(CREATE)
            cur.execute(MY_FILL.format(rows=rows))
        conn.commit()
    finally:
        conn.close()


def make_table(db: str, rows: int) -> None:
    if db == "postgres":
        asyncio.run(make_pg_table(rows))
    else:
        make_my_table(rows)


def drop_table(db: str) -> None:
    if db == "postgres":
        import asyncpg

        async def drop() -> None:
            conn = await asyncpg.connect(URLS["postgres"])
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            finally:
                await conn.close()

        asyncio.run(drop())
        return

    import pymysql

    conn = pymysql.connect(host="127.0.0.1", user="root", password="", database="manta_bench")
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {TABLE}")
    finally:
        conn.close()


# --- the store and the agent as processes ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_store(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    store = subprocess.Popen(
        [PYTHON, "-m", "manta_async", "store", "--data", str(data_dir), "--port", str(port),
         "--token", TOKEN],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=1):
                return store
        except OSError:
            time.sleep(0.1)
    store.kill()
    raise SystemExit(f"the store did not answer on port {port} within {START_TIMEOUT_S:g} s")


def write_config(work: Path, db: str, port: int, hash_in_source: bool) -> Path:
    path = work / f"{db}.toml"
    path.write_text(
        f"""[agent]
name = "stream-memory"
state_dir = "state-{db}"
log_level = "WARNING"

[store]
url = "http://127.0.0.1:{port}"
token = "{TOKEN}"

[sources.db]
url = "{URLS[db]}"

[tables.{TABLE}]
source = "db"
key = ["id"]
sql = "{SQL}"
hash_in_source = {str(hash_in_source).lower()}
""",
        encoding="utf-8",
    )
    return path


def run_agent(name: str, config: Path) -> Step:
    """Run the agent once as a process; return its time and its own peak RSS."""
    started = time.monotonic()
    agent = subprocess.Popen(
        [PYTHON, "-m", "manta_async", "-c", str(config), "run", "--once"],
        cwd=config.parent,
        stdout=subprocess.DEVNULL,
    )
    _pid, status, usage = os.wait4(agent.pid, 0)
    agent.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in kilobytes on Linux.
    return Step(name, time.monotonic() - started, usage.ru_maxrss / 1024, agent.returncode)


def measure(db: str, rows: int, work: Path) -> list[Step]:
    port = free_port()
    store = start_store(work / f"store-{db}", port)
    try:
        steps = [run_agent("first", write_config(work, db, port, hash_in_source=True))]
        steps.append(run_agent("unchanged", write_config(work, db, port, hash_in_source=True)))
        steps.append(run_agent("streamed", write_config(work, db, port, hash_in_source=False)))
    finally:
        store.terminate()
        store.wait(timeout=30)
    return steps


def report(db: str, rows: int, made_s: float, steps: list[Step]) -> None:
    print(f"\n{db}: {rows:,} rows (made in {made_s:.0f} s)")
    print(f"  {'run':<10} {'exit':>4} {'seconds':>9} {'rows/s':>10} {'peak RSS MB':>12}")
    for step in steps:
        rate = rows / step.seconds if step.seconds else 0.0
        print(
            f"  {step.name:<10} {step.exit_code:>4} {step.seconds:>9.1f} {rate:>10,.0f} "
            f"{step.peak_mb:>12.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--db", default="postgres,mariadb", help="postgres, mariadb or both")
    parser.add_argument("--max-rss-mb", type=float, help="exit 1 when a run peaks above this")
    args = parser.parse_args()

    failed = False
    for db in args.db.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"stream-memory-{db}-"))
        try:
            started = time.monotonic()
            make_table(db, args.rows)
            made_s = time.monotonic() - started
            steps = measure(db, args.rows, work)
        finally:
            drop_table(db)
            shutil.rmtree(work, ignore_errors=True)
        report(db, args.rows, made_s, steps)
        failed |= any(step.exit_code != 0 for step in steps)
        if args.max_rss_mb is not None:
            failed |= any(step.peak_mb > args.max_rss_mb for step in steps)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
