"""The store's SQLite file: applied batches, each table's last sequence, and the current rows.

Every SQLite connection lives on a thread of its own, so the event loop never waits on disk:

    writer   one connection, one thread: batches are applied one at a time, in arrival order
    reader   one connection, one thread: table listings and batch records
    stream   one connection and thread per rows download, holding one snapshot to its end

Rows are kept as the store received them: the key as the canonical bytes of its wire form and
the row as the orjson bytes of its wire values. The store never decodes them to apply a batch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from manta_async.errors import StoreError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000
CHUNK_ROWS = 1000
PIECE_BYTES = 256 * 1024

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tables (
    tid INTEGER PRIMARY KEY,
    agent TEXT NOT NULL,
    name TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    columns TEXT NOT NULL,
    key TEXT NOT NULL,
    row_count INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    UNIQUE (agent, name)
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    agent TEXT NOT NULL,
    tbl TEXT NOT NULL,
    seq INTEGER NOT NULL,
    changes INTEGER NOT NULL,
    applied_at TEXT NOT NULL,
    resent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rows (
    tid INTEGER NOT NULL REFERENCES tables (tid),
    key BLOB NOT NULL,
    n INTEGER NOT NULL,
    row BLOB NOT NULL,
    PRIMARY KEY (tid, key)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS rows_counted_on_insert AFTER INSERT ON rows BEGIN
    UPDATE tables SET row_count = row_count + NEW.n WHERE tid = NEW.tid;
END;
CREATE TRIGGER IF NOT EXISTS rows_counted_on_update AFTER UPDATE OF n ON rows BEGIN
    UPDATE tables SET row_count = row_count - OLD.n + NEW.n WHERE tid = NEW.tid;
END;
CREATE TRIGGER IF NOT EXISTS rows_counted_on_delete AFTER DELETE ON rows BEGIN
    UPDATE tables SET row_count = row_count - OLD.n WHERE tid = OLD.tid;
END;
"""

_UPSERT_ROW = (
    "INSERT INTO rows (tid, key, n, row) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (tid, key) DO UPDATE SET n = excluded.n, row = excluded.row"
)
_UPSERT_TABLE = (
    "INSERT INTO tables (agent, name, last_seq, columns, key, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (agent, name) DO UPDATE SET last_seq = excluded.last_seq, "
    "columns = excluded.columns, key = excluded.key, updated_at = excluded.updated_at "
    "RETURNING tid"
)


class SequenceGapError(StoreError):
    """A batch's sequence number is not the one after the table's last applied batch."""

    def __init__(self, expected_seq: int, got_seq: int) -> None:
        super().__init__(f"sequence gap: expected seq {expected_seq}, got {got_seq}")
        self.expected_seq = expected_seq
        self.got_seq = got_seq


class BatchIdReusedError(StoreError):
    """A batch id that was applied for one agent and table arrived for another."""


@dataclass(frozen=True)
class Batch:
    """A checked batch, ready to apply: keys and rows already in their stored byte form."""

    id: str
    agent: str
    table: str
    seq: int
    columns: list[dict[str, str]]
    key: list[str]
    deletes: list[bytes]
    upserts: list[tuple[bytes, int, bytes]]
    """(key bytes, n, row bytes) for every insert and update."""
    snapshot_part: int | None = None
    """Set when the batch is part of a full resend of the table: 1, 2, ... in order."""
    snapshot_last: bool = False
    """True on the last part: the resent copy then replaces the table's rows at once."""

    @property
    def changes(self) -> int:
        return len(self.deletes) + len(self.upserts)


@dataclass(frozen=True)
class Applied:
    """The answer to one batch: applied now, or found already applied earlier."""

    seq: int
    duplicate: bool


@dataclass(frozen=True)
class TableInfo:
    table: str
    rows: int
    last_seq: int
    columns: list[dict[str, str]]
    key: list[str]
    updated_at: str


@dataclass(frozen=True)
class BatchRecord:
    id: str
    agent: str
    table: str
    seq: int
    changes: int
    applied_at: str
    resent: int


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _connect(path: Path, query_only: bool) -> sqlite3.Connection:
    # isolation_level=None: transactions are opened and closed by hand, with BEGIN IMMEDIATE
    # where a writer must hold the lock from its first read.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = FULL")
    if query_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


class _Worker:
    """One thread owning one SQLite connection, which never leaves that thread."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def open(self, path: Path, query_only: bool) -> None:
        def connect() -> None:
            self._conn = _connect(path, query_only)

        await self._submit(connect)

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._conn is None:
                raise StoreError("the store database is not open; open the store before use")
            return work(self._conn)

        return await self._submit(call)

    def close_soon(self) -> None:
        """Close the connection after the work already queued, without waiting for it."""
        if not self._closed:
            self._closed = True
            self._executor.submit(self._close)
            self._executor.shutdown(wait=False)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._submit(self._close)
            self._executor.shutdown(wait=True)

    async def _submit(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _create_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the store database has schema version {version}, newer than this manta-async "
            f"knows ({SCHEMA_VERSION}); upgrade manta-async or use another data directory"
        )

    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise StoreError(f"SQLite refused WAL journal mode (got {mode!r})")

    conn.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _apply(conn: sqlite3.Connection, batch: Batch) -> Applied:
    conn.execute("BEGIN IMMEDIATE")
    try:
        applied = _apply_in_transaction(conn, batch)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return applied


def _apply_in_transaction(conn: sqlite3.Connection, batch: Batch) -> Applied:
    # A batch id seen before is answered from its record: the uploader lost our earlier answer.
    earlier = conn.execute(
        "SELECT agent, tbl, seq FROM batches WHERE id = ?", (batch.id,)
    ).fetchone()
    if earlier is not None:
        return _count_resend(conn, batch, earlier)

    # Only the next batch of the table may be applied; anything else waits for the missing one.
    # The first part of a snapshot starts the table's history afresh, whatever came before.
    found = conn.execute(
        "SELECT tid, last_seq, columns, key FROM tables WHERE agent = ? AND name = ?",
        (batch.agent, batch.table),
    ).fetchone()
    expected_seq = (found[1] if found else 0) + 1
    if batch.seq != expected_seq and batch.snapshot_part != 1:
        raise SequenceGapError(expected_seq, batch.seq)

    # A snapshot part keeps the table's current shape until its last part replaces the rows.
    now = _now()
    keeps_shape = found is not None and batch.snapshot_part is not None
    columns = found[2] if keeps_shape else orjson.dumps(batch.columns).decode()
    key = found[3] if keeps_shape else orjson.dumps(batch.key).decode()
    (tid,) = conn.execute(
        _UPSERT_TABLE, (batch.agent, batch.table, batch.seq, columns, key, now)
    ).fetchone()

    if batch.snapshot_part is None:
        _apply_changes(conn, tid, batch)
    else:
        _apply_snapshot_part(conn, tid, batch)

    conn.execute(
        "INSERT INTO batches (id, agent, tbl, seq, changes, applied_at, resent) "
        "VALUES (?, ?, ?, ?, ?, ?, 0)",
        (batch.id, batch.agent, batch.table, batch.seq, batch.changes, now),
    )
    return Applied(seq=batch.seq, duplicate=False)


def _apply_changes(conn: sqlite3.Connection, tid: int, batch: Batch) -> None:
    # Deletes first, so a row whose key moved never meets its own old copy.
    conn.executemany(
        "DELETE FROM rows WHERE tid = ? AND key = ?", ((tid, key) for key in batch.deletes)
    )
    conn.executemany(_UPSERT_ROW, ((tid, key, n, row) for key, n, row in batch.upserts))


def _apply_snapshot_part(conn: sqlite3.Connection, tid: int, batch: Batch) -> None:
    # The resent copy grows under the negative tid, unseen by readers and by the row count,
    # and takes the place of the live rows in the transaction of its last part.
    staging = -tid
    if batch.snapshot_part == 1:
        conn.execute("DELETE FROM rows WHERE tid = ?", (staging,))
    conn.executemany(_UPSERT_ROW, ((staging, key, n, row) for key, n, row in batch.upserts))
    if not batch.snapshot_last:
        return

    conn.execute("DELETE FROM rows WHERE tid = ?", (tid,))
    conn.execute("UPDATE rows SET tid = ? WHERE tid = ?", (tid, staging))
    conn.execute(
        "UPDATE tables SET columns = ?, key = ?, "
        "row_count = (SELECT coalesce(sum(n), 0) FROM rows WHERE tid = ?) WHERE tid = ?",
        (orjson.dumps(batch.columns).decode(), orjson.dumps(batch.key).decode(), tid, tid),
    )


def _count_resend(conn: sqlite3.Connection, batch: Batch, earlier: tuple[Any, ...]) -> Applied:
    agent, table, seq = earlier
    if (agent, table) != (batch.agent, batch.table):
        raise BatchIdReusedError(
            f"batch id {batch.id} was already applied for agent {agent!r}, table {table!r}; "
            "every batch needs a new id"
        )

    conn.execute("UPDATE batches SET resent = resent + 1 WHERE id = ?", (batch.id,))
    return Applied(seq=seq, duplicate=True)


def _list_tables(conn: sqlite3.Connection, agent: str) -> list[TableInfo]:
    found = conn.execute(
        "SELECT name, row_count, last_seq, columns, key, updated_at FROM tables "
        "WHERE agent = ? ORDER BY name",
        (agent,),
    ).fetchall()
    return [
        TableInfo(name, rows, seq, orjson.loads(columns), orjson.loads(key), updated_at)
        for name, rows, seq, columns, key, updated_at in found
    ]


def _find_batch(conn: sqlite3.Connection, agent: str, batch_id: str) -> BatchRecord | None:
    found = conn.execute(
        "SELECT id, agent, tbl, seq, changes, applied_at, resent FROM batches "
        "WHERE id = ? AND agent = ?",
        (batch_id, agent),
    ).fetchone()
    return BatchRecord(*found) if found else None


class RowSnapshot:
    """One table's rows as of one moment, in key order."""

    def __init__(self, worker: _Worker, info: TableInfo, cursor: sqlite3.Cursor) -> None:
        self._worker = worker
        self._cursor = cursor
        self.info = info

    async def pieces(self, encode_row: Callable[[bytes], bytes]) -> AsyncIterator[bytes]:
        """Yield the table's rows as bytes, each row `encode_row(row)` repeated n times.

        Rows are fetched `CHUNK_ROWS` at a time and encoded on the snapshot's own thread; a
        piece holds about `PIECE_BYTES`, so memory stays bounded for any table and any n.
        """
        encoded = _encode_rows(self._cursor, encode_row)

        def next_piece(_conn: sqlite3.Connection) -> bytes | None:
            return next(encoded, None)

        while (piece := await self._worker.run(next_piece)) is not None:
            yield piece


def _encode_rows(cursor: sqlite3.Cursor, encode_row: Callable[[bytes], bytes]) -> Iterator[bytes]:
    out = bytearray()
    while rows := cursor.fetchmany(CHUNK_ROWS):
        for row, n in rows:
            line = encode_row(row)
            copies_per_piece = max(1, PIECE_BYTES // max(1, len(line)))
            while n > 0:
                copies = min(n, copies_per_piece)
                out += line * copies
                n -= copies
                if len(out) >= PIECE_BYTES:
                    yield bytes(out)
                    out.clear()

        if out:
            yield bytes(out)
            out.clear()


def _open_snapshot(
    conn: sqlite3.Connection, agent: str, table: str
) -> tuple[TableInfo, sqlite3.Cursor] | None:
    # The read transaction pins one WAL snapshot: the header's seq and every row streamed
    # belong to the same state, whatever batches are applied meanwhile.
    conn.execute("BEGIN")
    found = conn.execute(
        "SELECT tid, row_count, last_seq, columns, key, updated_at FROM tables "
        "WHERE agent = ? AND name = ?",
        (agent, table),
    ).fetchone()
    if found is None:
        return None

    tid, rows, seq, columns, key, updated_at = found
    info = TableInfo(table, rows, seq, orjson.loads(columns), orjson.loads(key), updated_at)
    cursor = conn.execute("SELECT row, n FROM rows WHERE tid = ? ORDER BY key", (tid,))
    return info, cursor


class StoreDB:
    """The store's database file, `DIR/store.db`, opened with `open()` and closed with `close()`."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "store.db"
        self._writer = _Worker("manta-store-write")
        self._reader = _Worker("manta-store-read")

    async def open(self) -> None:
        """Create the directory and the schema if needed, and open the writer and the reader."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            await self._writer.open(self.path, query_only=False)
            await self._writer.run(_create_schema)
            await self._reader.open(self.path, query_only=True)
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StoreError(f"cannot open the store database {self.path}: {exc}") from exc

        logger.debug("opened store database %s", self.path)

    async def close(self) -> None:
        """Close both connections after the work already queued on them."""
        await self._reader.close()
        await self._writer.close()

    async def apply(self, batch: Batch) -> Applied:
        """Apply a batch at most once and in sequence, in one transaction.

        Raises `SequenceGapError` when the batch is not the table's next one and
        `BatchIdReusedError` when its id belongs to another table; nothing changes then.
        """
        try:
            return await self._writer.run(lambda conn: _apply(conn, batch))
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot apply batch {batch.id} (agent {batch.agent!r}, table {batch.table!r}, "
                f"seq {batch.seq}) to {self.path}: {exc}"
            ) from exc

    async def tables(self, agent: str) -> list[TableInfo]:
        """Return the tables an agent has uploaded, by name."""
        try:
            return await self._reader.run(lambda conn: _list_tables(conn, agent))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot list the tables of agent {agent!r}: {exc}") from exc

    async def batch(self, agent: str, batch_id: str) -> BatchRecord | None:
        """Return the record of an applied batch of this agent, or None."""
        try:
            return await self._reader.run(lambda conn: _find_batch(conn, agent, batch_id))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read batch {batch_id} of agent {agent!r}: {exc}") from exc

    @asynccontextmanager
    async def rows(self, agent: str, table: str) -> AsyncIterator[RowSnapshot | None]:
        """Open a snapshot of a table's rows on a connection of its own; None if unknown."""
        worker = _Worker("manta-store-stream")
        try:
            opened = await self._open_snapshot(worker, agent, table)
            yield RowSnapshot(worker, *opened) if opened else None
        finally:
            # Not awaited: a cancelled download must still release its thread and connection.
            worker.close_soon()

    async def _open_snapshot(
        self, worker: _Worker, agent: str, table: str
    ) -> tuple[TableInfo, sqlite3.Cursor] | None:
        try:
            await worker.open(self.path, query_only=True)
            return await worker.run(lambda conn: _open_snapshot(conn, agent, table))
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read table {table!r} of agent {agent!r}: {exc}") from exc
