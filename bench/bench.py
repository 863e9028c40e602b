"""How long a run takes next to the database's own export, on PostgreSQL, MariaDB and SQLite.

    python bench/bench.py --rows 1000000 --db postgres,mariadb,sqlite

For each database the benchmark creates a table of --rows rows (an integer key, text, a
decimal(12,2), a timestamp, a boolean and a 32-character text: about 95 bytes a row as CSV),
starts a real store on loopback, and times, each step as a process of its own so that its
peak memory is its own:

- export     the database's bulk export of the SELECT (PostgreSQL COPY ... TO STDOUT CSV via
             asyncpg, the mariadb client's --batch --quick, the sqlite3 shell's CSV mode),
             written to a file whose size is the "dump" figure;
- fetch      a bare driver read in chunks (asyncpg cursor, aiomysql SSCursor, aiosqlite);
- first      `manta-async run --once` on an empty state: every row sent, up to the store
             having applied it;
- unchanged  the same command again, nothing changed;
- churn      the same command after 1% of the rows changed: a third inserted, a third
             updated, a third deleted.

The unchanged and churn runs reach the store through a counting proxy in this process, which
adds up the request bodies: the bytes sent. --stream also times, last, an unchanged run with
hash_in_source = false (every row read). The servers are the ones on 127.0.0.1 the tests use
(PostgreSQL user postgres, MariaDB user root); the tables live in a database manta_bench.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Each benchmark has a table of its own, so that two of them (or the smoke test) can share the
# servers; the step processes find its name in the environment.
TABLE = os.environ.setdefault("MANTA_BENCH_TABLE", f"bench_rows_{os.getpid()}")
SQL = f"SELECT id, name, amount, created, active, code FROM {TABLE}"
TOKEN = "bench-token"
AGENT = "bench"
PG_URL = "postgresql://postgres@127.0.0.1:5432/manta_bench"
MY_URL = "mysql://root@127.0.0.1:3306/manta_bench"
FETCH_CHUNK = 5000


# --- the steps run as processes of their own -------------------------------------------------


async def pg_copy(out: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.copy_from_query(SQL, output=out, format="csv")
    finally:
        await conn.close()


async def pg_fetch() -> int:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    rows = 0
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = await conn.cursor(SQL)
            while chunk := await cursor.fetch(FETCH_CHUNK):
                rows += len(chunk)
    finally:
        await conn.close()
    return rows


async def my_fetch() -> int:
    import aiomysql

    conn = await aiomysql.connect(host="127.0.0.1", user="root", db="manta_bench",
                                  charset="utf8mb4", cursorclass=aiomysql.SSCursor)  # fmt: skip
    rows = 0
    try:
        cursor = await conn.cursor()
        await cursor.execute(SQL)
        while chunk := await cursor.fetchmany(FETCH_CHUNK):
            rows += len(chunk)
    finally:
        conn.close()
    return rows


async def lite_fetch(path: str) -> int:
    import aiosqlite

    rows = 0
    async with aiosqlite.connect(path) as conn:
        cursor = await conn.execute(SQL)
        while chunk := await cursor.fetchmany(FETCH_CHUNK):
            rows += len(chunk)
    return rows


def run_step(argv: Sequence[str]) -> None:
    """The hidden step commands: `_copy OUT`, `_fetch KIND [SQLITE_FILE]`."""
    if argv[0] == "_copy":
        asyncio.run(pg_copy(argv[1]))
    elif argv[0] == "_fetch" and argv[1] == "postgres":
        asyncio.run(pg_fetch())
    elif argv[0] == "_fetch" and argv[1] == "mariadb":
        asyncio.run(my_fetch())
    elif argv[0] == "_fetch" and argv[1] == "sqlite":
        asyncio.run(lite_fetch(argv[2]))
    else:
        raise SystemExit(f"unknown step {' '.join(argv)}")


# --- the tables ------------------------------------------------------------------------------


def pg_admin(statements: list[str]) -> None:
    import asyncpg

    async def go() -> None:
        admin = await asyncpg.connect(PG_URL.rsplit("/", 1)[0] + "/postgres")
        try:
            exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'manta_bench'")
            if not exists:
                await admin.execute("CREATE DATABASE manta_bench")
        finally:
            await admin.close()
        conn = await asyncpg.connect(PG_URL)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def my_admin(statements: list[str]) -> None:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", user="root", password="", autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS manta_bench CHARACTER SET utf8mb4")
            cursor.execute("USE manta_bench")
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()


def lite_admin(path: Path, statements: list[str]) -> None:
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)


def create_table(kind: str, rows: int, lite: Path) -> None:
    """A fresh table of `rows` rows; every 97th name is NULL."""
    if kind == "postgres":
        pg_admin([
            f"DROP TABLE IF EXISTS {TABLE}",
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name text, amount numeric(12,2), "
            "created timestamp, active boolean, code text)",
            f"INSERT INTO {TABLE} SELECT i, CASE WHEN i % 97 = 0 THEN NULL ELSE 'customer ' "
            "|| (i * 7919 % 100000) END, (i * 37 % 10000000) / 100.0, timestamp '2020-01-01' "
            "+ i * interval '17 second 123 microsecond', i % 3 = 0, md5(i::text) "
            f"FROM generate_series(1::bigint, {rows}) i",
            f"VACUUM ANALYZE {TABLE}",
        ])  # fmt: skip
    elif kind == "mariadb":
        my_admin([
            f"DROP TABLE IF EXISTS {TABLE}",
            f"CREATE TABLE {TABLE} (id BIGINT PRIMARY KEY, name VARCHAR(100), "
            "amount DECIMAL(12,2), created DATETIME(6), active BOOLEAN, code CHAR(32)) "
            "CHARACTER SET utf8mb4",
            f"INSERT INTO {TABLE} SELECT seq, IF(seq % 97 = 0, NULL, CONCAT('customer ', "
            "seq * 7919 % 100000)), (seq * 37 % 10000000) / 100, TIMESTAMP'2020-01-01 00:00:00'"
            " + INTERVAL seq * 17 SECOND + INTERVAL seq * 123 MICROSECOND, seq % 3 = 0, "
            f"MD5(seq) FROM seq_1_to_{rows}",
            f"ANALYZE TABLE {TABLE}",
        ])  # fmt: skip
    else:
        lite.unlink(missing_ok=True)
        lite_admin(lite, [
            f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, name TEXT, amount DECIMAL(12,2), "
            "created TEXT, active BOOLEAN, code TEXT)",
            f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows}) "
            f"INSERT INTO {TABLE} SELECT i, CASE WHEN i % 97 = 0 THEN NULL ELSE 'customer ' "
            "|| (i * 7919 % 100000) END, (i * 37 % 10000000) / 100.0, "
            "strftime('%Y-%m-%d %H:%M:%f', '2020-01-01', '+' || (i * 17) || ' seconds'), "
            "i % 3 = 0, lower(hex(randomblob(16))) FROM s",
        ])  # fmt: skip


def churn(kind: str, rows: int, lite: Path) -> int:
    """Change 1% of the rows: a third updated, a third deleted, a third inserted."""
    step = 300
    new_from, new_to = rows + 1, rows + rows // step
    statements = [
        f"UPDATE {TABLE} SET name = 'changed', amount = amount + 1 WHERE id % {step} = 7",
        f"DELETE FROM {TABLE} WHERE id % {step} = 11",
    ]
    if kind == "postgres":
        statements.append(
            f"INSERT INTO {TABLE} SELECT i, 'new', 1.5, timestamp '2030-01-01', true, "
            f"md5(i::text) FROM generate_series({new_from}::bigint, {new_to}) i"
        )
        pg_admin(statements)
    elif kind == "mariadb":
        statements.append(
            f"INSERT INTO {TABLE} SELECT seq, 'new', 1.5, '2030-01-01', 1, MD5(seq) "
            f"FROM seq_{new_from}_to_{new_to}"
        )
        my_admin(statements)
    else:
        statements.append(
            f"WITH RECURSIVE s(i) AS (SELECT {new_from} UNION ALL SELECT i + 1 FROM s "
            f"WHERE i < {new_to}) INSERT INTO {TABLE} SELECT i, 'new', 1.5, "
            "'2030-01-01 00:00:00.000', 1, lower(hex(randomblob(16))) FROM s"
        )
        lite_admin(lite, statements)
    return rows // step * 3


def count_rows(kind: str, lite: Path) -> int:
    sql = f"SELECT count(*) FROM {TABLE}"
    if kind == "postgres":
        import asyncpg

        async def go() -> int:
            conn = await asyncpg.connect(PG_URL)
            try:
                return int(await conn.fetchval(sql))
            finally:
                await conn.close()

        return asyncio.run(go())
    if kind == "mariadb":
        import pymysql

        conn = pymysql.connect(host="127.0.0.1", user="root", password="", db="manta_bench")
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return int(cursor.fetchone()[0])
        finally:
            conn.close()
    with sqlite3.connect(lite) as lite_conn:
        return int(lite_conn.execute(sql).fetchone()[0])


def drop_table(kind: str, lite: Path) -> None:
    if kind == "postgres":
        pg_admin([f"DROP TABLE IF EXISTS {TABLE}"])
    elif kind == "mariadb":
        my_admin([f"DROP TABLE IF EXISTS {TABLE}"])
    else:
        lite.unlink(missing_ok=True)


# --- measuring -------------------------------------------------------------------------------


@dataclass
class Figure:
    db: str
    step: str
    seconds: float
    rows: int
    peak_mb: float
    sent_bytes: int | None = None
    diff_s: float | None = None
    """The agent's own figure for reading and diffing the table, out of `seconds`."""


@dataclass
class Counter:
    """Request body bytes the proxy forwarded to the store."""

    bytes: int = 0


async def timed(argv: list[str], stdout: Path | None = None) -> tuple[float, float]:
    """Run one step as a process; return its wall time and peak RSS in MB."""
    seconds, peak, _ = await timed_with_log(argv, stdout)
    return seconds, peak


async def timed_with_log(argv: list[str], stdout: Path | None = None) -> tuple[float, float, str]:
    """Run one step as a process; return its wall time, peak RSS in MB and stderr."""
    report = tempfile.NamedTemporaryFile(suffix=".time", delete=False)
    report.close()
    command = ["/usr/bin/time", "-f", "%e %M", "-o", report.name, *argv]
    sink = await asyncio.to_thread(open, stdout or os.devnull, "wb")
    try:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *command, stdout=sink, stderr=asyncio.subprocess.PIPE, cwd=ROOT
        )
        _, stderr = await process.communicate()
        seconds = time.perf_counter() - started
    finally:
        sink.close()
    text = await asyncio.to_thread(Path(report.name).read_text)
    os.unlink(report.name)
    if process.returncode != 0:
        raise SystemExit(f"step failed ({process.returncode}): {' '.join(argv)}\n"
                         f"{stderr.decode()[-3000:]}")  # fmt: skip
    peak_kb = int(text.split()[-1])
    return seconds, peak_kb / 1024, stderr.decode(errors="replace")


def diff_s(log: str) -> float | None:
    """The seconds the agent logged for reading and diffing the table."""
    match = re.search(r"rows read, .* batches \((\d+\.\d+)s\)", log)
    return float(match.group(1)) if match else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def start_proxy(target: str, counter: Counter) -> web.AppRunner:
    """A loopback proxy to the store that adds up the request bodies it forwards."""
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        counter.bytes += len(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with session.request(request.method, target + request.path_qs, data=body,
                                   headers=headers) as answer:  # fmt: skip
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding",
                                         "content-encoding")}  # fmt: skip
            return web.Response(status=answer.status, body=payload, headers=kept)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", forward)
    app.on_cleanup.append(lambda _app: session.close())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


def write_config(path: Path, store_url: str, source_url: str, hash_in_source: bool) -> None:
    path.write_text(
        "\n".join([
            "[agent]", f'name = "{AGENT}"', 'state_dir = "state"', 'log_level = "INFO"',
            "[store]", f'url = "{store_url}"', f'token = "{TOKEN}"',
            "[sources.db]", f'url = "{source_url}"',
            f"[tables.{TABLE}]", 'source = "db"', 'key = ["id"]', f'sql = "{SQL}"',
            f"hash_in_source = {'true' if hash_in_source else 'false'}",
        ]) + "\n",
        encoding="utf-8",
    )  # fmt: skip


async def wait_for(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/v1/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"the store at {url} did not answer within {timeout_s:g} s")


async def store_rows(url: str) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{url}/v1/agents/{AGENT}/tables") as response:
            body = await response.json()
    return int(next(t["rows"] for t in body["tables"] if t["table"] == TABLE))


# --- one database ----------------------------------------------------------------------------


@dataclass
class Bench:
    work: Path
    rows: int
    stream: bool
    figures: list[Figure] = field(default_factory=list)
    dump_bytes: dict[str, int] = field(default_factory=dict)

    async def run(self, kind: str) -> None:
        folder = self.work / kind
        folder.mkdir(parents=True, exist_ok=True)
        lite = folder / "source.db"
        print(f"{kind}: creating {self.rows} rows", file=sys.stderr)
        await asyncio.to_thread(create_table, kind, self.rows, lite)
        try:
            await self.baselines(kind, folder, lite)
            await self.agent_runs(kind, folder, lite)
        finally:
            await asyncio.to_thread(drop_table, kind, lite)

    async def baselines(self, kind: str, folder: Path, lite: Path) -> None:
        dump = folder / "dump.csv"
        if kind == "postgres":
            seconds, peak = await timed([PYTHON, __file__, "_copy", str(dump)])
        elif kind == "mariadb":
            argv = ["mariadb", "-h", "127.0.0.1", "-u", "root", "--batch", "--quick",
                    "manta_bench", "-e", SQL]  # fmt: skip
            seconds, peak = await timed(argv, stdout=dump)
        else:
            seconds, peak = await timed(["sqlite3", "-csv", str(lite), SQL], stdout=dump)
        self.dump_bytes[kind] = dump.stat().st_size
        dump.unlink()
        self.figures.append(Figure(kind, "export", seconds, self.rows, peak))

        fetch = [PYTHON, __file__, "_fetch", kind] + ([str(lite)] if kind == "sqlite" else [])
        seconds, peak = await timed(fetch)
        self.figures.append(Figure(kind, "fetch", seconds, self.rows, peak))

    async def agent_runs(self, kind: str, folder: Path, lite: Path) -> None:
        source_url = {"postgres": PG_URL, "mariadb": MY_URL}.get(kind, f"sqlite:///{lite}")
        store_port, proxy_port = free_port(), free_port()
        store_url = f"http://127.0.0.1:{store_port}"
        store = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "manta_async", "store", "--data", str(folder / "store"),
            "--port", str(store_port), "--token", TOKEN,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        counter = Counter()
        proxy = await start_proxy(store_url, counter)
        await web.TCPSite(proxy, "127.0.0.1", proxy_port).start()
        try:
            await wait_for(store_url)
            await self.sync_steps(kind, folder, lite, source_url, store_url, proxy_port, counter)
            if await store_rows(store_url) != await asyncio.to_thread(count_rows, kind, lite):
                raise SystemExit(f"{kind}: the store's row count differs from the source's")
        finally:
            await proxy.cleanup()
            store.terminate()
            await store.wait()

    async def sync_steps(
        self, kind: str, folder: Path, lite: Path, source_url: str, store_url: str,
        proxy_port: int, counter: Counter,
    ) -> None:  # fmt: skip
        direct, counted = folder / "direct.toml", folder / "counted.toml"
        write_config(direct, store_url, source_url, True)
        write_config(counted, f"http://127.0.0.1:{proxy_port}", source_url, True)
        shutil.rmtree(folder / "state", ignore_errors=True)
        agent = [PYTHON, "-m", "manta_async", "-c"]

        seconds, peak, log = await timed_with_log([*agent, str(direct), "run", "--once"])
        self.figures.append(Figure(kind, "first", seconds, self.rows, peak, None, diff_s(log)))

        counter.bytes = 0
        seconds, peak, log = await timed_with_log([*agent, str(counted), "run", "--once"])
        self.figures.append(Figure(kind, "unchanged", seconds, self.rows, peak, counter.bytes,
                                   diff_s(log)))  # fmt: skip

        changed = await asyncio.to_thread(churn, kind, self.rows, lite)
        counter.bytes = 0
        seconds, peak, log = await timed_with_log([*agent, str(counted), "run", "--once"])
        self.figures.append(Figure(kind, f"churn ({changed} rows)", seconds, self.rows, peak,
                                   counter.bytes, diff_s(log)))  # fmt: skip

        # Last: a run without buckets drops the table's sums, so the next would read every row.
        if self.stream:
            streamed = folder / "streamed.toml"
            write_config(streamed, store_url, source_url, False)
            seconds, peak, log = await timed_with_log([*agent, str(streamed), "run", "--once"])
            self.figures.append(Figure(kind, "unchanged, stream", seconds, self.rows, peak,
                                       None, diff_s(log)))  # fmt: skip


# --- the table -------------------------------------------------------------------------------


def render(bench: Bench) -> str:
    head = ("db", "step", "seconds", "diff s", "rows/s", "peak MB", "× export", "× fetch",
            "sent bytes", "sent / dump")  # fmt: skip
    lines = [head]
    base = {(f.db, f.step): f.seconds for f in bench.figures}
    for f in bench.figures:
        dump = bench.dump_bytes.get(f.db, 0)
        sent = "" if f.sent_bytes is None else f"{f.sent_bytes:,}"
        share = "" if f.sent_bytes is None or not dump else f"{f.sent_bytes / dump:.3%}"
        lines.append((
            f.db, f.step, f"{f.seconds:.2f}", "" if f.diff_s is None else f"{f.diff_s:.2f}",
            f"{f.rows / f.seconds:,.0f}", f"{f.peak_mb:.0f}",
            f"{f.seconds / base[(f.db, 'export')]:.2f}", f"{f.seconds / base[(f.db, 'fetch')]:.2f}",
            sent, share,
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
            for line in lines]  # fmt: skip
    dumps = ", ".join(f"{db} {size:,} bytes" for db, size in bench.dump_bytes.items())
    return "\n".join(text) + f"\n\nfull dump of the table: {dumps}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the table")
    parser.add_argument("--db", default="postgres,mariadb,sqlite",
                        help="comma-separated: postgres, mariadb, sqlite")  # fmt: skip
    parser.add_argument("--stream", action="store_true",
                        help="also time an unchanged run that reads every row")  # fmt: skip
    parser.add_argument("--work", type=Path, help="folder for state and store (default: temp)")
    return parser.parse_args(argv)


async def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    kinds = [kind.strip() for kind in args.db.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in ("postgres", "mariadb", "sqlite")]
    if unknown or not kinds or args.rows < 300:
        raise SystemExit("--db takes postgres, mariadb, sqlite; --rows at least 300")
    work = args.work or Path(tempfile.mkdtemp(prefix="manta-bench-"))
    bench = Bench(work, args.rows, args.stream)
    try:
        for kind in kinds:
            await bench.run(kind)
            # A long benchmark shows each database's figures as soon as they are known.
            print(render(bench), file=sys.stderr)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(bench))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and re.match(r"_\w+$", sys.argv[1]):
        run_step(sys.argv[1:])
    else:
        sys.exit(asyncio.run(main(sys.argv[1:])))
