"""The durable queue of batches waiting for the store: persist-queue's SQLiteAckQueue.

A batch is put as the orjson bytes the index staged (no second encoding) and goes through
the queue's states: pending, in flight (taken by the uploader), acked (the store applied it)
or failed (the store refused it; parked until `manta-async queue retry`).

persist-queue 1.1 has traps this wrapper keeps away from the rest of the code:
- Opening a queue with auto_resume turns every in-flight item back to pending, even one
  another process is sending; only the draining process, which holds the drain lock, opens
  it that way. Processes that only put open it without resuming.
- `ack(item)` finds the item by object identity; we always ack, nack and fail by id.
- A `nack` after an `ack` brings an item back; an id is acked or failed once, never nacked
  after.
- `qsize()` is a per-process counter that drifts; counts come from the table itself.
- Acked rows stay until cleared; `clear_acked` keeps the most recent for `queue list`, and
  always passes a delete limit (without one, 1.1 builds SQL that SQLite rejects).
Every commit of the queue is made with `synchronous=FULL`.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

from manta_async.errors import QueueError, StateError, first_problem, is_damage

T = TypeVar("T")

PENDING = "pending"
IN_FLIGHT = "in flight"
ACKED = "acked"
FAILED = "failed"
_STATUS_NAMES = {
    int(AckStatus.inited): PENDING,
    int(AckStatus.ready): PENDING,
    int(AckStatus.unack): IN_FLIGHT,
    int(AckStatus.acked): ACKED,
    int(AckStatus.ack_failed): FAILED,
}
_TABLE = "ack_queue_default"


class _OrjsonSerializer:
    """persist-queue serializer: orjson, never pickle.

    `dumps` is handed an `orjson.Fragment` of the staged bytes, which orjson writes as they
    are; `loads` returns the batch as a dict.
    """

    @staticmethod
    def dumps(value: Any) -> bytes:
        return orjson.dumps(value)

    @staticmethod
    def loads(data: bytes) -> Any:
        return orjson.loads(data)


class _DurableAckQueue(SQLiteAckQueue):
    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> Any:
        conn = super()._new_db_connection(path, multithreading, timeout)
        conn.execute("PRAGMA synchronous=FULL")
        return conn


@dataclass(frozen=True)
class QueueEntry:
    """One batch in the queue, as `manta-async queue` shows it."""

    pqid: int
    status: str
    queued_at: float
    size_bytes: int
    batch_id: str
    table: str
    seq: int
    rows: int
    reason: str | None = None


@dataclass(frozen=True)
class Taken:
    """A batch taken by the uploader: in flight until acked, failed or released."""

    pqid: int
    batch_id: str
    table: str
    seq: int
    rows: int
    payload: bytes


class BatchQueue:
    """The queue in `state_dir/queue/`; an async context manager.

    `drain=True` resumes in-flight batches on open and must only be used by the process that
    holds the drain lock.
    """

    def __init__(self, state_dir: Path, *, drain: bool) -> None:
        self.path = state_dir / "queue"
        self.drain = drain
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="manta-queue")
        self._queue: Any = None
        self._read: sqlite3.Connection | None = None

    async def __aenter__(self) -> BatchQueue:
        await self.call(self._open)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.call(self._close)
        self._executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking queue method on the queue's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._converting, fn, *args)

    def _converting(self, fn: Callable[..., T], *args: Any) -> T:
        # A full disk can fail any write (take, ack, park); each leaves the batch in a state
        # the next run resumes from, so the user needs one line, not a traceback.
        try:
            return fn(*args)
        except sqlite3.OperationalError as exc:
            raise QueueError(
                f"cannot write to the queue {self.path / 'data.db'} ({exc}); no batch is lost, "
                "the next run resumes where this one stopped. If the disk is full, free space "
                "and run again"
            ) from exc

    def _open(self) -> None:
        data = self.path / "data.db"
        if data.exists() and data.stat().st_size == 0:
            # SQLite would take an emptied file for a new queue: its batches would be lost.
            raise StateError(
                f"the queue {data} is empty (0 bytes), so it was truncated and the batches it "
                f"held are gone; move the folder {self.path} aside and run 'manta-async "
                "resync' for every table"
            )
        try:
            self._create_file()
            self._queue = _DurableAckQueue(
                str(self.path),
                auto_resume=self.drain,
                multithreading=True,
                serializer=_OrjsonSerializer,
                timeout=30.0,
            )
            self._read = sqlite3.connect(self.path / "data.db", isolation_level=None)
            self._read.execute("PRAGMA busy_timeout=30000")
            self._read.execute("PRAGMA synchronous=FULL")
            self._read.execute(
                "CREATE TABLE IF NOT EXISTS manta_failures "
                "(pqid INTEGER PRIMARY KEY, reason TEXT NOT NULL, failed_at REAL NOT NULL)"
            )
            check = self._read.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(first_problem(check))
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise StateError(
                    f"cannot open the queue {self.path / 'data.db'} ({exc}); nothing was "
                    "changed. If the disk is full, free space and run again"
                ) from exc
            raise StateError(
                f"the queue {self.path / 'data.db'} is damaged ({exc}); move the folder "
                f"{self.path} aside and run 'manta-async resync' for every table"
            ) from exc

    def _create_file(self) -> None:
        # auto_vacuum can only be chosen before a file has its first table, so the file is
        # made here before persist-queue opens it: cleared batches then give back their pages.
        data = self.path / "data.db"
        if data.exists():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        # Made aside and linked into place: a crash never leaves an empty data.db, which means
        # damage, and of processes starting at once the first link wins, the others use it.
        new = self.path / f"data.db.{os.getpid()}.new"
        conn = sqlite3.connect(new)
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
        finally:
            conn.close()
        try:
            os.link(new, data)
        except FileExistsError:
            pass
        finally:
            new.unlink()

    def _close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        if self._read is not None:
            self._read.close()
            self._read = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._read is None:
            raise QueueError("The queue is not open; use it inside 'async with BatchQueue(...)'.")
        return self._read

    # Putting

    def put(self, payload: bytes) -> int:
        """Put one staged batch; return its queue id once it is on disk."""
        try:
            pqid: int = self._queue.put(orjson.Fragment(payload))
        except sqlite3.OperationalError as exc:
            raise QueueError(
                f"cannot write to the queue {self.path} ({exc}); the batch stays in the index's "
                "outbox and the next run queues it. If the disk is full, free space and run again"
            ) from exc
        return pqid

    # Draining

    def next_pending(self, after: int) -> tuple[int, dict[str, Any]] | None:
        """The first pending batch with a queue id above `after`, without taking it."""
        row = self._conn.execute(
            f"SELECT _id, data FROM {_TABLE} WHERE _id > ? AND status < ? ORDER BY _id LIMIT 1",
            (after, int(AckStatus.unack)),
        ).fetchone()
        if row is None:
            return None
        return row[0], orjson.loads(row[1])

    def take(self, pqid: int) -> Taken:
        """Mark a pending batch in flight and return it ready to send."""
        item = self._queue.get(id=pqid, raw=True)
        batch = item["data"]
        payload = orjson.dumps(batch)
        rows = len(batch["changes"])
        return Taken(pqid, batch["id"], batch["table"], batch["seq"], rows, payload)

    def ack(self, pqid: int) -> None:
        self._queue.ack(id=pqid)

    def release(self, pqid: int) -> None:
        """Put an in-flight batch back to pending, for a later attempt."""
        self._queue.nack(id=pqid)

    def fail(self, pqid: int, reason: str) -> None:
        """Park a batch the store refused; it waits for `retry`, and blocks its table."""
        self._conn.execute(
            "INSERT OR REPLACE INTO manta_failures (pqid, reason, failed_at) VALUES (?, ?, ?)",
            (pqid, reason, time.time()),
        )
        self._queue.ack_failed(id=pqid)

    def retry(self, pqid: int) -> bool:
        """Return a failed batch to pending; False if `pqid` is not a failed batch."""
        status = self.statuses([pqid]).get(pqid)
        if status != FAILED:
            return False
        self._queue.nack(id=pqid)
        self._conn.execute("DELETE FROM manta_failures WHERE pqid = ?", (pqid,))
        return True

    def drop_unsent(self, table: str) -> int:
        """Drop the table's pending and parked batches, for a full resend that replaces them.

        A batch in flight is left to its uploader. Returns how many were dropped; they are
        acked, so nothing of them is sent and none holds the table back.
        """
        dropped = 0
        for entry in self.entries():
            if entry.table == table and entry.status in (PENDING, FAILED):
                self._queue.ack(id=entry.pqid)
                dropped += 1
        return dropped

    def clear_acked(self, keep_latest: int = 20) -> None:
        """Delete the acked batches but the latest few, and give their space back."""
        # persist-queue writes OFFSET without LIMIT when max_delete is unset, which SQLite
        # rejects: always give a limit.
        self._queue.clear_acked_data(max_delete=1_000_000, keep_latest=keep_latest)
        # The pragma frees one page per step: executescript steps it to its end.
        self._conn.executescript("PRAGMA incremental_vacuum;")

    # Looking

    def counts(self) -> dict[str, int]:
        """Number of batches in each state, read from the queue's table."""
        counts = dict.fromkeys((PENDING, IN_FLIGHT, ACKED, FAILED), 0)
        for status, count in self._conn.execute(
            f"SELECT status, count(*) FROM {_TABLE} GROUP BY status"
        ):
            counts[_STATUS_NAMES[int(status)]] += count
        return counts

    def statuses(self, pqids: Iterable[int]) -> dict[int, str]:
        ids = list(pqids)
        found: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT _id, status FROM {_TABLE} WHERE _id IN ({marks})"
            for pqid, status in self._conn.execute(sql, part):
                found[pqid] = _STATUS_NAMES[int(status)]
        return found

    def entries(self, *, include_acked: bool = False, pqid: int | None = None) -> list[QueueEntry]:
        """The batches in the queue, oldest first, with their headers read."""
        where = "" if include_acked else f"WHERE q.status != {int(AckStatus.acked)}"
        if pqid is not None:
            where = "WHERE q._id = ?"
        sql = (
            f"SELECT q._id, q.status, q.timestamp, length(q.data), q.data, f.reason "
            f"FROM {_TABLE} q LEFT JOIN manta_failures f ON f.pqid = q._id {where} "
            "ORDER BY q._id"
        )
        params = () if pqid is None else (pqid,)
        result = []
        for row_id, status, queued_at, size, data, reason in self._conn.execute(sql, params):
            batch = orjson.loads(data)
            result.append(
                QueueEntry(
                    row_id,
                    _STATUS_NAMES[int(status)],
                    queued_at,
                    size,
                    batch["id"],
                    batch["table"],
                    batch["seq"],
                    len(batch["changes"]),
                    reason,
                )
            )
        return result

    def payload(self, pqid: int) -> dict[str, Any] | None:
        row = self._conn.execute(f"SELECT data FROM {_TABLE} WHERE _id = ?", (pqid,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def blocked_tables(self) -> set[str]:
        """Tables with a parked batch: their later batches must wait."""
        sql = f"SELECT data FROM {_TABLE} WHERE status = ?"
        rows = self._conn.execute(sql, (int(AckStatus.ack_failed),))
        return {orjson.loads(data)["table"] for (data,) in rows}
