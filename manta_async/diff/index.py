"""The index: for each table, key → row hash of every row the store has been sent, on disk.

The index lives in one SQLite file, `index.db`, with the *outbox*: the batches a run produced
but has not yet handed to the queue. A table's run updates its index and stages its batches in
one transaction, so the two can never disagree: either the run committed (the new hashes and
every batch that carries them), or it left no trace. The outbox is then moved batch by batch
into the durable queue; a crash during the move puts a batch twice, and the store, which
applies a batch id at most once, ignores the second copy.

All methods are blocking; `Index.call` runs them on the index's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from manta_async.errors import StateError, first_problem, is_damage

T = TypeVar("T")

FULL_CHECK_EVERY_S = 24 * 3600.0
"""How often opening the index checks every page of it; in between, only its small tables."""
_SMALL_TABLES = ("tables", "outbox", "bucket_sums", "checks")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (
    name TEXT PRIMARY KEY,
    slot INTEGER NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL DEFAULT 1,
    columns TEXT NOT NULL DEFAULT '[]',
    key TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    synced_at REAL,
    resync INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    seq INTEGER,
    batch_id TEXT NOT NULL UNIQUE,
    phase INTEGER NOT NULL,
    header BLOB NOT NULL,
    changes BLOB NOT NULL,
    rows INTEGER NOT NULL,
    part INTEGER,
    last INTEGER
);
CREATE TABLE IF NOT EXISTS checks (
    name TEXT PRIMARY KEY,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class TableState:
    """What the index knows of one table."""

    name: str
    slot: int
    next_seq: int
    columns: list[dict[str, str]]
    key: list[str] | None
    rows: int
    resync: bool

    @property
    def idx_table(self) -> str:
        return f"idx_{self.slot}"


@dataclass(frozen=True)
class OutboxBatch:
    """A batch staged by a committed run and not yet put into the queue."""

    id: int
    table: str
    seq: int
    batch_id: str
    rows: int
    part: int | None
    """Set when the batch is part of a full resend of the table."""
    last: bool | None

    def payload(self, agent: str, header: bytes, changes: bytes) -> bytes:
        fields = orjson.loads(header)
        fields.update(id=self.batch_id, agent=agent, table=self.table, seq=self.seq)
        if self.part is not None:
            fields["snapshot"] = {"part": self.part, "last": bool(self.last)}
        fields["changes"] = orjson.Fragment(changes)
        return orjson.dumps(fields)


class Index:
    """The index file of one agent; an async context manager around one SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manta-index")
        self._conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> Index:
        await self.call(self._open)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.call(self._close)
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking index method on the index's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError("The index is not open; use it inside 'async with Index(...)'.")
        return self._conn

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size == 0:
            # SQLite would take an emptied file for a new index and forget every table.
            raise StateError(
                f"the index {self.path} is empty (0 bytes), so it was truncated; move it aside "
                "and run 'manta-async resync' for every table to rebuild it from the sources"
            )
        try:
            if not self.path.exists():
                self._create_file()
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            # Set before the first table exists: lets the outbox give back its pages.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before it returns, so power loss cannot undo it.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=10000")
            self._check(conn)
            conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise StateError(
                    f"cannot open the index {self.path} ({exc}); nothing was changed. If the "
                    "disk is full, free space and run again"
                ) from exc
            raise self.damaged(exc) from exc
        self._conn = conn

    def damaged(self, exc: BaseException) -> StateError:
        """The error for damage SQLite found in the index, at opening or later."""
        return StateError(
            f"the index {self.path} is damaged ({exc}); move it aside and run "
            "'manta-async resync' for every table to rebuild it from the sources"
        )

    def _check(self, conn: sqlite3.Connection) -> None:
        # Every page once a day: reading all of a large index takes seconds, which each
        # hourly run finding nothing changed would pay. In between, the small tables are
        # checked, and damage in a table's rows is found when a run reads them.
        names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        checked_at = 0.0
        if "checks" in names:
            found = conn.execute("SELECT at FROM checks WHERE name = 'full'").fetchone()
            checked_at = found[0] if found else 0.0
        full = not 0 <= time.time() - checked_at < FULL_CHECK_EVERY_S
        checks = ["PRAGMA quick_check"] if full else [
            f"PRAGMA quick_check({name})" for name in _SMALL_TABLES if name in names
        ]  # fmt: skip
        for check in checks:
            result = conn.execute(check).fetchone()[0]
            if result != "ok":
                raise sqlite3.DatabaseError(first_problem(result))
        if full and "checks" in names:
            # Not recorded on a full disk: the next run checks every page again.
            with contextlib.suppress(sqlite3.OperationalError):
                conn.execute("INSERT OR REPLACE INTO checks VALUES ('full', ?)", (time.time(),))

    def _create_file(self) -> None:
        # Made aside and linked into place: a crash or a full disk never leaves an empty
        # index.db, which would mean damage, and a second process never replaces the first's.
        new = self.path.with_name(f"{self.path.name}.{os.getpid()}.new")
        conn = sqlite3.connect(new)
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
        try:
            os.link(new, self.path)
        except FileExistsError:
            pass
        finally:
            new.unlink()

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # Tables

    def table_state(self, name: str) -> TableState | None:
        row = self.conn.execute(
            "SELECT name, slot, next_seq, columns, key, rows, resync FROM tables WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
        key = orjson.loads(row[4]) if row[4] is not None else None
        return TableState(row[0], row[1], row[2], orjson.loads(row[3]), key, row[5], bool(row[6]))

    def tables(self) -> list[TableState]:
        names = [r[0] for r in self.conn.execute("SELECT name FROM tables ORDER BY name")]
        return [state for name in names if (state := self.table_state(name)) is not None]

    def new_slot(self, name: str) -> TableState:
        """Give a table a new, empty index (inside the open transaction) and drop the old one.

        Used the first time a table is seen and for every full resend of it.
        """
        old = self.table_state(name)
        slot = self.conn.execute("SELECT coalesce(max(slot), 0) + 1 FROM tables").fetchone()[0]
        if old is None:
            self.conn.execute("INSERT INTO tables (name, slot) VALUES (?, ?)", (name, slot))
        else:
            self.conn.execute(f"DROP TABLE {old.idx_table}")
            self.conn.execute("UPDATE tables SET slot = ? WHERE name = ?", (slot, name))
        self.conn.execute(
            f"CREATE TABLE idx_{slot} (key BLOB NOT NULL UNIQUE, hash BLOB NOT NULL, "
            "n INTEGER NOT NULL DEFAULT 1)"
        )
        state = self.table_state(name)
        assert state is not None
        return state

    def mark_resync(self, name: str) -> bool:
        """Have the table's next run send it in full; False if the index does not know it."""
        cursor = self.conn.execute("UPDATE tables SET resync = 1 WHERE name = ?", (name,))
        return cursor.rowcount == 1

    # Outbox

    def outbox(self) -> list[OutboxBatch]:
        """Committed batches not yet queued, in the order each table must apply them."""
        rows = self.conn.execute(
            "SELECT id, tbl, seq, batch_id, rows, part, last FROM outbox WHERE seq IS NOT NULL "
            "ORDER BY tbl, seq"
        ).fetchall()
        return [OutboxBatch(*row) for row in rows]

    def outbox_payload(self, batch: OutboxBatch, agent: str) -> bytes:
        header, changes = self.conn.execute(
            "SELECT header, changes FROM outbox WHERE id = ?", (batch.id,)
        ).fetchone()
        return batch.payload(agent, header, changes)

    def outbox_done(self, batch: OutboxBatch) -> None:
        try:
            self.conn.execute("DELETE FROM outbox WHERE id = ?", (batch.id,))
        except sqlite3.OperationalError as exc:
            raise StateError(
                f"cannot write the index {self.path} ({exc}) after batch {batch.seq} of table "
                f"{batch.table!r} was queued; the next run queues it again and the store "
                "ignores the copy. If the disk is full, free space and run again"
            ) from exc

    def release_space(self) -> None:
        """Give the pages of the emptied outbox back to the file system."""
        # The pragma frees one page per step; executescript steps it to its end, where
        # execute would stop after the first page.
        self.conn.executescript("PRAGMA incremental_vacuum;")
