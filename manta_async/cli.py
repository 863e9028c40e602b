"""The `manta-async` command line. Exit codes are listed in docs/cli.md."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from manta_async import __version__, agent
from manta_async.config import Config, load_config
from manta_async.diff import codec
from manta_async.errors import LockedError, MantaError
from manta_async.logs import setup_logging

T = TypeVar("T")
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '1d' or a number of seconds → seconds."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def fail(message: str, code: int = agent.EXIT_ERROR) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; turn expected failures into one red line and an exit code."""
    try:
        return asyncio.run(coro)
    except LockedError as exc:
        fail(str(exc), agent.EXIT_LOCKED)
    except MantaError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")


def _load(ctx: click.Context) -> Config:
    path: Path = ctx.obj["config_path"]
    try:
        config = load_config(path)
    except MantaError as exc:
        fail(str(exc))
    setup_logging(config.agent.log_format, ctx.obj["log_level"] or config.agent.log_level)
    return config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default="manta.toml",
    envvar="MANTA_CONFIG",
    show_default=True,
    help="The config file (or set MANTA_CONFIG).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Override [agent] log_level.",
)
@click.version_option(__version__, prog_name="manta-async")
@click.pass_context
def main(ctx: click.Context, config_path: Path, log_level: str | None) -> None:
    """Keep a current copy of chosen SQL views on a remote store, sending only what changed.

    \b
    Examples:
      manta-async demo                       try it all on an embedded example
      manta-async -c shop.toml check         validate the config, reach sources and store
      manta-async -c shop.toml sql orders    show the first rows of a table's SELECT
      manta-async -c shop.toml run --once    one sync, from cron
      manta-async -c shop.toml serve --every 1h
      manta-async -c shop.toml queue status
    """
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path
    ctx.obj["log_level"] = log_level.upper() if log_level else None


@main.command()
@click.option("--once", is_flag=True, help="Run once and exit (the form for cron).")
@click.option("--table", "tables", multiple=True, help="Only this table (repeatable).")
@click.option("--no-upload", is_flag=True, help="Stage and queue the changes; send nothing.")
@click.option("--allow-mass-delete", is_flag=True,
              help="Let tables delete more than max_delete_share of their rows.")  # fmt: skip
@click.pass_context
def run(
    ctx: click.Context,
    once: bool,
    tables: tuple[str, ...],
    no_upload: bool,
    allow_mass_delete: bool,
) -> None:
    """Read every table, queue what changed, and deliver the queue to the store.

    \b
    Exit codes: 0 all delivered, 1 error, 3 batches still queued (store unreachable),
    4 a batch was refused and parked, 5 a table could not be read, 6 another run holds
    the state directory.

    \b
    Example (crontab):
      */15 * * * *  manta-async -c /etc/manta/shop.toml run --once

    \b
    A table whose run would delete more than max_delete_share of its rows (default half)
    is held back with exit 5; confirm once the rows are really gone:
      manta-async -c shop.toml run --once --allow-mass-delete --table orders
    """
    if not once:
        fail("'run' needs --once; for a continuous agent use 'manta-async serve --every 1h'", 2)
    config = _load(ctx)
    names = _table_names(config, tables)
    run_report = agent.run_once(
        config, names, drain=not no_upload, allow_mass_delete=allow_mass_delete
    )
    report = run_async(run_report)
    _print_run(report)
    sys.exit(report.exit_code)


@main.command()
@click.argument("tables", nargs=-1, required=True)
@click.option("--no-upload", is_flag=True, help="Stage and queue the resend; send nothing.")
@click.pass_context
def resync(ctx: click.Context, tables: tuple[str, ...], no_upload: bool) -> None:
    """Send tables again in full; the store replaces its copy of each at once.

    For a store whose copy is in doubt, or after the index was moved aside. Exit codes as
    for 'run --once'.

    \b
    Example:
      manta-async -c shop.toml resync orders order_lines
    """
    config = _load(ctx)
    names = _table_names(config, tables)
    run_async(agent.mark_resync(config, names))
    report = run_async(agent.run_once(config, names, drain=not no_upload))
    _print_run(report)
    sys.exit(report.exit_code)


def _table_names(config: Config, tables: tuple[str, ...]) -> list[str]:
    unknown = [t for t in tables if t not in config.tables]
    if unknown:
        known = ", ".join(config.tables) or "none"
        fail(f"no table {unknown[0]!r} in {config.path} (tables: {known})", 2)
    return list(tables) or list(config.tables)


def _print_run(report: agent.RunReport) -> None:
    grid = Table(title="sync", title_justify="left")
    for column in ("table", "rows", "inserts", "updates", "deletes", "batches", "result"):
        grid.add_column(column, justify="left" if column in ("table", "result") else "right")
    outcomes = report.sync.tables if report.sync else []
    for outcome in outcomes:
        if outcome.stats is None:
            grid.add_row(outcome.table, "", "", "", "", "", "[red]failed[/]")
            continue
        s = outcome.stats
        row = [s.rows, s.inserts, s.updates, s.deletes, s.batches]
        result = "ok" if s.snapshot is None else f"sent in full ({s.snapshot})"
        grid.add_row(outcome.table, *(str(v) for v in row), escape(result))
    out.print(grid)
    for outcome in outcomes:
        if outcome.error:
            err.print(f"[bold red]error:[/] {escape(outcome.error)}", soft_wrap=True)
    if report.drain is not None:
        d = report.drain
        out.print(f"delivered {d.applied} batches ({d.duplicates} already applied)")
        if d.unreachable:
            message = f"{d.unreachable}; the batches stay queued for the next run"
            err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        if d.refused:
            err.print(f"[bold red]error:[/] {escape(d.refused)}", soft_wrap=True)
    if report.handed_over:
        out.print("another process (serve) is draining the queue; waited for it")
    counts = report.counts
    if report.waiting or counts.get("failed"):
        out.print(
            f"[yellow]queue: {counts.get('pending', 0)} pending, "
            f"{counts.get('in flight', 0)} in flight, {counts.get('failed', 0)} failed[/] "
            "(see 'manta-async queue status')"
        )


@main.command()
@click.option("--every", type=parse_duration, help="Also sync every table this often: 1h, 15m.")
@click.pass_context
def serve(ctx: click.Context, every: float | None) -> None:
    """Drain the queue continuously; with --every, also run the tables on that schedule.

    SIGTERM or Ctrl-C finishes the batch in flight and exits cleanly.

    \b
    Example:
      manta-async -c shop.toml serve --every 1h
    """
    config = _load(ctx)

    async def main_loop() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for name in ("SIGTERM", "SIGINT"):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    loop.add_signal_handler(sig, stop.set)
                except NotImplementedError:
                    pass
        await agent.serve(config, every_s=every, stop=stop)

    run_async(main_loop())


@main.group()
def queue() -> None:
    """Look at the batches waiting for the store.

    \b
    Examples:
      manta-async queue status      counts per table and state
      manta-async queue list --all  every batch, acked ones too
      manta-async queue show 42     one batch's header and first changes
      manta-async queue retry 42    send a parked batch again
    """


def _with_queue(ctx: click.Context, fn: Callable[[Any], T]) -> T:
    from manta_async.queue.batchqueue import BatchQueue

    config = _load(ctx.parent) if ctx.parent else _load(ctx)

    async def use() -> T:
        async with BatchQueue(config.state_dir, drain=False) as q:
            return await q.call(fn, q)

    return run_async(use())


@queue.command("status")
@click.pass_context
def queue_status(ctx: click.Context) -> None:
    """Pending, in-flight and failed batches per table, with sizes and ages."""
    entries = _with_queue(ctx, lambda q: q.entries())
    grid = Table(title="queue", title_justify="left")
    for column in ("table", "pending", "in flight", "failed", "changes", "bytes", "oldest"):
        grid.add_column(column, justify="left" if column == "table" else "right")
    now = time.time()
    per_table: dict[str, dict[str, Any]] = {}
    for e in entries:
        t = per_table.setdefault(
            e.table, {"pending": 0, "in flight": 0, "failed": 0, "rows": 0, "bytes": 0, "at": now}
        )
        t[e.status] += 1
        t["rows"] += e.rows
        t["bytes"] += e.size_bytes
        t["at"] = min(t["at"], e.queued_at)
    for name, t in sorted(per_table.items()):
        cells = [t["pending"], t["in flight"], t["failed"], t["rows"], t["bytes"]]
        grid.add_row(name, *(str(c) for c in cells), _age(now - t["at"]))
    out.print(grid if per_table else "the queue is empty: everything reached the store")


@queue.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include acked batches still kept.")
@click.pass_context
def queue_list(ctx: click.Context, show_all: bool) -> None:
    """Every batch in the queue, oldest first."""
    entries = _with_queue(ctx, lambda q: q.entries(include_acked=show_all))
    grid = Table()
    for column in ("id", "table", "seq", "state", "changes", "bytes", "age", "batch id / reason"):
        grid.add_column(column, justify="right" if column in ("id", "seq", "changes") else "left")
    now = time.time()
    for e in entries:
        detail = e.reason if e.reason else e.batch_id
        cells = [e.pqid, e.table, e.seq, e.status, e.rows, e.size_bytes, _age(now - e.queued_at)]
        grid.add_row(*(str(c) for c in cells), detail)
    out.print(grid if entries else "the queue is empty")


@queue.command("show")
@click.argument("pqid", type=int)
@click.option("--changes", "limit", default=10, show_default=True, help="Changes to print.")
@click.pass_context
def queue_show(ctx: click.Context, pqid: int, limit: int) -> None:
    """One batch: its header and its first changes."""
    found = _with_queue(ctx, lambda q: (q.entries(pqid=pqid), q.payload(pqid)))
    entries, batch = found
    if not entries or batch is None:
        fail(f"no batch with id {pqid} in the queue; see 'manta-async queue list --all'")
    e = entries[0]
    out.print(f"batch {e.pqid}: table {e.table!r}, seq {e.seq}, {e.status}, {e.rows} changes")
    out.print(f"batch id {e.batch_id}, queued {time.ctime(e.queued_at)}, {e.size_bytes} bytes")
    if e.reason:
        out.print(f"[red]refused:[/] {escape(e.reason)}")
    out.print("columns: " + ", ".join(f"{c['name']} {c['type']}" for c in batch["columns"]))
    for change in batch["changes"][:limit]:
        out.print(f"  {change[0]:7} {escape(codec.dumps(change[1:]).decode())}", soft_wrap=True)


@queue.command("retry")
@click.argument("pqid", type=int)
@click.pass_context
def queue_retry(ctx: click.Context, pqid: int) -> None:
    """Return a parked (failed) batch to the queue, to be sent again on the next drain."""
    if not _with_queue(ctx, lambda q: q.retry(pqid)):
        fail(f"batch {pqid} is not a failed batch; see 'manta-async queue list'")
    out.print(f"batch {pqid} is pending again")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@main.command()
@click.argument("table")
@click.option("--limit", default=10, show_default=True, help="Rows to print.")
@click.pass_context
def sql(ctx: click.Context, table: str, limit: int) -> None:
    """Run a table's SELECT and print its column types and first rows.

    \b
    Example:
      manta-async -c shop.toml sql orders --limit 5
    """
    from manta_async.commands import preview

    config = _load(ctx)
    _table_names(config, (table,))
    columns, rows = run_async(preview(config, table, limit))
    grid = Table(title=f"{table}: {config.tables[table].sql}", title_justify="left")
    for column in columns:
        grid.add_column(f"{column.name}\n[dim]{column.type or '?'}[/]")
    for row in rows:
        cells = ("NULL" if v is None else codec.text_value(codec.encode_value(v)) for v in row)
        grid.add_row(*(escape(cell) for cell in cells))
    out.print(grid)


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the config and reach every source and the store."""
    from manta_async.commands import check_all

    config = _load(ctx)
    problems = run_async(check_all(config, out))
    if problems:
        fail(f"{problems} check(s) failed")
    out.print("[green]all checks passed[/]")


@main.command()
@click.option("--data", "data_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for the store's SQLite database.")  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8640, show_default=True)
@click.option("--token", envvar="MANTA_STORE_TOKEN", default="",
              help="Bearer token agents must send (or set MANTA_STORE_TOKEN).")  # fmt: skip
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
def store(data_dir: Path, host: str, port: int, token: str, log_format: str) -> None:
    """Run the receiving store: applies batches, serves current rows over HTTP.

    \b
    Example:
      manta-async store --data /var/lib/manta --port 8640 --token "$TOKEN"
    """
    from manta_async.store import run_store

    setup_logging("json" if log_format == "json" else "text", "INFO")
    run_async(run_store(data_dir, host, port, token))


@main.command()
@click.option("--dir", "work_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the demo's files here instead of a temporary folder.")  # fmt: skip
def demo(work_dir: Path | None) -> None:
    """Sync an embedded SQLite example to a local store, change it, sync again, compare."""
    from manta_async.demo import run_demo

    setup_logging("text", "WARNING")
    ok = run_async(run_demo(out, work_dir))
    sys.exit(0 if ok else 1)
