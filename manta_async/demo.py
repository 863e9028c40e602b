"""`manta-async demo`: the whole job on an embedded example, with nothing to set up.

It writes a small SQLite shop database and a config beside it, starts a store on a free
loopback port, syncs, changes some rows, syncs again, syncs once more with nothing changed,
and compares the store's copy with the source value by value.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.table import Table

from manta_async import agent
from manta_async.config import Config, parse_config
from manta_async.diff import codec
from manta_async.store import StoreServer

_TOKEN = "demo-token"
_CONFIG = """\
[agent]
name = "demo-shop"
state_dir = "state"

[store]
url = "{url}"
token = "{token}"
retry_for_s = 5

[sources.shop]
url = "sqlite:///shop.db"

[tables.products]
source = "shop"
key = ["id"]
sql = "SELECT id, name, price, stock, photo, updated_at FROM products"

[tables.order_lines]
source = "shop"
key = ["order_id", "line"]
sql = "SELECT order_id, line, product_id, quantity FROM order_lines"

[tables.tags]
source = "shop"
sql = "SELECT tag, product_id FROM tags"
"""


def _create_shop(path: Path) -> None:
    rng = random.Random(7)
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, price REAL,
                                   stock INTEGER, photo BLOB, updated_at TEXT);
            CREATE TABLE order_lines (order_id INTEGER, line INTEGER, product_id INTEGER,
                                      quantity INTEGER, PRIMARY KEY (order_id, line));
            CREATE TABLE tags (tag TEXT, product_id INTEGER);
            """
        )
        db.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?, ?, ?)",
            [
                (i, f"product {i} ✓", round(rng.uniform(1, 200), 2), rng.randint(0, 50),
                 bytes([i % 256, 0, 255]) if i % 3 else None, f"2026-11-{1 + i % 28:02d}")
                for i in range(1, 51)
            ],
        )  # fmt: skip
        db.executemany(
            "INSERT INTO order_lines VALUES (?, ?, ?, ?)",
            [(o, n, rng.randint(1, 50), rng.randint(1, 5)) for o in range(1, 41) for n in (1, 2)],
        )
        db.executemany(
            "INSERT INTO tags VALUES (?, ?)",
            [("sale", 1), ("sale", 1), ("new", 2), ("new", 3), (None, 4)],
        )


def _change_shop(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE products SET price = price + 1.5 WHERE id IN (3, 4, 5)")
        db.execute("UPDATE products SET name = '' WHERE id = 6")
        db.execute("UPDATE products SET photo = NULL WHERE id = 7")
        db.execute("INSERT INTO products VALUES (51, 'new product', 9.99, 3, x'DEADBEEF', NULL)")
        db.execute("DELETE FROM order_lines WHERE order_id = 1 AND line = 2")
        db.execute("UPDATE order_lines SET order_id = 99 WHERE order_id = 2 AND line = 1")
        db.execute("INSERT INTO tags VALUES ('sale', 1)")
        db.execute("DELETE FROM tags WHERE tag = 'new' AND product_id = 3")
    return [
        "products: 3 prices raised, a name emptied, a photo removed, a product added",
        "order_lines: a line deleted, a line moved from order 2 to order 99",
        "tags: a third copy of ('sale', 1), ('new', 3) removed",
    ]


async def _store_rows(url: str, agent_name: str, table: str) -> list[list[Any]]:
    headers = {"Authorization": f"Bearer {_TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        address = f"{url}/v1/agents/{agent_name}/tables/{table}/rows?format=ndjson"
        async with session.get(address) as response:
            response.raise_for_status()
            body = await response.read()
    return [orjson.loads(line) for line in body.splitlines() if line]


def _source_rows(config: Config, db: Path, table: str) -> list[list[Any]]:
    with sqlite3.connect(db) as conn:
        return [codec.encode_row(row) for row in conn.execute(config.tables[table].sql)]


async def _compare(console: Console, config: Config, db: Path, url: str) -> bool:
    equal = True
    for table in config.tables:
        source = sorted(codec.dumps(r) for r in _source_rows(config, db, table))
        stored = sorted(codec.dumps(r) for r in await _store_rows(url, config.agent.name, table))
        same = source == stored
        equal &= same
        verdict = "[green]equal[/]" if same else "[red]DIFFERENT[/]"
        console.print(f"  {table:12} source {len(source):3} rows, store {len(stored):3} rows: "
                      f"{verdict}")  # fmt: skip
    return equal


def _show(console: Console, title: str, report: agent.RunReport) -> None:
    grid = Table(title=title, title_justify="left")
    for column in ("table", "rows", "inserts", "updates", "deletes", "batches"):
        grid.add_column(column, justify="left" if column == "table" else "right")
    for outcome in report.sync.tables if report.sync else []:
        s = outcome.stats
        if s is None:
            grid.add_row(outcome.table, f"[red]{outcome.error}[/]")
            continue
        grid.add_row(outcome.table, *(str(v) for v in (s.rows, s.inserts, s.updates,
                                                        s.deletes, s.batches)))  # fmt: skip
    console.print(grid)
    delivered = report.drain.applied if report.drain else 0
    console.print(f"  delivered {delivered} batches; exit code would be {report.exit_code}\n")


async def run_demo(console: Console, work_dir: Path | None) -> bool:
    """Run the demo in `work_dir` (a temporary folder if None); True if the copies match."""
    with tempfile.TemporaryDirectory(prefix="manta-demo-") as tmp:
        base = (work_dir or Path(tmp)).resolve()
        base.mkdir(parents=True, exist_ok=True)
        db = base / "shop.db"
        if db.exists():
            db.unlink()
        _create_shop(db)

        async with StoreServer(base / "store", token=_TOKEN) as store:
            config_path = base / "manta.toml"
            config_path.write_text(_CONFIG.format(url=store.url, token=_TOKEN), encoding="utf-8")
            config = parse_config(config_path.read_text(encoding="utf-8"), config_path)
            console.print(f"[bold]manta-async demo[/] in {base}")
            console.print(f"  source: {db}\n  store:  {store.url}\n")
            names = list(config.tables)

            _show(console, "1. first sync: every row is new", await agent.run_once(config, names))
            for line in _change_shop(db):
                console.print(f"  changed {line}")
            _show(console, "2. second sync: only the changes", await agent.run_once(config, names))
            _show(console, "3. third sync: nothing changed", await agent.run_once(config, names))

            console.print("[bold]the store's copy, value by value[/]")
            equal = await _compare(console, config, db, store.url)
        console.print("\n[green]the store equals the source[/]" if equal else "[red]mismatch[/]")
        return equal
