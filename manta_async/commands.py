"""The work behind `sql` and `check`: a look at a table's rows, and a reach for everything."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

from manta_async.config import Config
from manta_async.errors import MantaError
from manta_async.extract import connect
from manta_async.extract.base import Column, Row
from manta_async.transport.client import StoreClient


async def preview(config: Config, table: str, limit: int) -> tuple[list[Column], list[Row]]:
    """The columns and first `limit` rows of a table's SELECT, read the way a run reads."""
    rows: list[Row] = []
    async with await connect(
        config.source_for(table), config.path.parent, name=config.tables[table].source
    ) as source:
        async with source.read(config.tables[table].sql, max(1, limit)) as result:
            async for chunk in result.chunks():
                rows.extend(chunk[: limit - len(rows)])
                if len(rows) >= limit:
                    break
            return result.columns, rows


async def check_all(config: Config, console: Console) -> int:
    """Reach every source, run every table's SELECT for its columns, reach the store.

    Prints one line per check and returns how many failed.
    """
    failed = 0
    console.print(f"[green]ok[/]   config {config.path}: {len(config.tables)} tables")
    for name in config.tables:
        try:
            columns, _rows = await preview(config, name, 1)
        except MantaError as exc:
            console.print(f"[red]fail[/] table {name}: {escape(str(exc))}", soft_wrap=True)
            failed += 1
            continue
        names = [c.name for c in columns]
        missing = [k for k in config.tables[name].key or [] if k not in names]
        if missing:
            console.print(
                f"[red]fail[/] table {name}: key column(s) {escape(str(missing))} are not in "
                f"the SELECT's columns {escape(str(names))}"
            )
            failed += 1
        else:
            console.print(f"[green]ok[/]   table {name}: {len(columns)} columns")
    try:
        async with StoreClient(config.store, config.agent.name) as client:
            await client.health()
        console.print(f"[green]ok[/]   store {config.store.url}")
    except MantaError as exc:
        console.print(f"[red]fail[/] store: {escape(str(exc))}", soft_wrap=True)
        failed += 1
    return failed
