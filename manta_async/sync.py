"""A sync run: read each table, diff it against the index, and queue the changes.

For each table the run
1. reads the table's SELECT to its end, in chunks, from a snapshot of the source;
2. diffs every chunk against the index inside one index transaction;
3. commits the new index and the batches that carry the changes together (the outbox);
4. moves the outbox into the durable queue, batch by batch.

A read cut short, duplicate keys or a value that cannot be encoded abandon that table's run
before step 3: nothing of it is queued and its index is untouched; the other tables still run.
Step 4 starts by finishing whatever a crashed run left in the outbox, so batches reach the
queue in order, and possibly twice, which the store ignores by batch id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from manta_async.config import Config
from manta_async.diff.buckets import diff_by_buckets, forget_sums
from manta_async.diff.differ import DiffStats, TableDiff
from manta_async.diff.index import Index
from manta_async.errors import EncodeError, SourceError, StateError, TableError, is_damage
from manta_async.extract import Column, Row, Source, connect
from manta_async.extract.base import BucketSource
from manta_async.faults import crash_point
from manta_async.queue.batchqueue import BatchQueue

log = logging.getLogger(__name__)

NewDiff = Callable[[list[Column]], TableDiff]


@dataclass
class TableOutcome:
    """How one table's run ended."""

    table: str
    stats: DiffStats | None = None
    error: str | None = None


@dataclass
class SyncResult:
    """What a sync run did: an outcome per table and the queue ids of the batches it put."""

    tables: list[TableOutcome] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)

    @property
    def failed(self) -> list[TableOutcome]:
        return [outcome for outcome in self.tables if outcome.error is not None]


async def flush_outbox(index: Index, queue: BatchQueue, agent: str) -> list[int]:
    """Move the committed batches from the outbox into the queue; return their queue ids."""
    queued = []
    for batch in await index.call(index.outbox):
        payload = await index.call(index.outbox_payload, batch, agent)
        pqid = await queue.call(queue.put, payload)
        crash_point("queued")
        await index.call(index.outbox_done, batch)
        queued.append(pqid)
    if queued:
        await index.call(index.release_space)
    return queued


async def sync_tables(
    config: Config,
    index: Index,
    queue: BatchQueue,
    names: list[str],
    *,
    allow_mass_delete: bool = False,
) -> SyncResult:
    """Run every named table once; a failing table does not stop the others.

    `allow_mass_delete` lets a run delete more than the table's max_delete_share.
    """
    result = SyncResult()

    # A crashed run may have committed batches it never queued: they go first.
    result.queued += await flush_outbox(index, queue, config.agent.name)

    for name in names:
        outcome = TableOutcome(name)
        try:
            outcome.stats = await sync_table(config, index, name, allow_mass_delete)
        except (TableError, SourceError) as exc:
            outcome.error = str(exc)
            log.error("%s", exc)
        result.tables.append(outcome)
        result.queued += await flush_outbox(index, queue, config.agent.name)
    return result


async def sync_table(
    config: Config, index: Index, name: str, allow_mass_delete: bool = False
) -> DiffStats:
    """Read, diff and stage one table; raise TableError or SourceError if it was abandoned."""
    table = config.tables[name]
    source_config = config.source_for(name)

    def new_diff(columns: list[Column]) -> TableDiff:
        share = None if allow_mass_delete else config.max_delete_share(name)
        agent = config.agent
        return TableDiff(index, name, table.key, columns, agent.batch_rows, agent.batch_bytes,
                         max_delete_share=share)  # fmt: skip

    try:
        async with await connect(source_config, config.path.parent, name=table.source) as source:
            if table.hash_in_source and isinstance(source, BucketSource):
                stats = await _sync_buckets(config, index, source, name, new_diff)
            else:
                stats = await _sync_stream(config, index, source, name, new_diff)
    except EncodeError as exc:
        raise TableError(name, f"{exc}; nothing of this run was sent") from exc
    except SourceError as exc:
        raise TableError(
            name, f"{exc}; nothing of this run was sent, the next run reads it again"
        ) from exc
    except sqlite3.OperationalError as exc:
        raise StateError(
            f"cannot write the index {index.path} ({exc}); nothing of table {name!r} was "
            "sent. If the disk is full, free space and run again"
        ) from exc
    except sqlite3.DatabaseError as exc:
        if not is_damage(exc):
            raise
        raise index.damaged(exc) from exc

    crash_point("index-committed")
    if stats.snapshot is not None and stats.snapshot != "first run":
        log.warning("table %r is sent in full: %s", name, stats.snapshot)
    log.info(
        "table %r: %d rows read, %d inserts, %d updates, %d deletes in %d batches (%.2fs)",
        name, stats.rows, stats.inserts, stats.updates, stats.deletes, stats.batches,
        stats.seconds,
    )  # fmt: skip
    return stats


async def _sync_stream(
    config: Config, index: Index, source: Source, name: str, new_diff: NewDiff
) -> DiffStats:
    # Every row of the table is read and compared with the index.
    table = config.tables[name]
    async with source.read(table.sql, config.agent.chunk_rows) as result:
        diff = new_diff(result.columns)
        await index.call(diff.start)

        def commit() -> DiffStats:
            forget_sums(index.conn, name)
            return diff.commit()

        return await _diff_all(index, diff, result.chunks(), commit=commit)


async def _sync_buckets(
    config: Config, index: Index, source: BucketSource, name: str, new_diff: NewDiff
) -> DiffStats:
    # Only the buckets of keys whose sums moved are read (see diff/buckets.py).
    table = config.tables[name]
    async with source.read_buckets(table.sql, table.key) as read:
        diff = new_diff(read.columns)
        await index.call(diff.start)
        return await diff_by_buckets(index, diff, read, config.agent.chunk_rows, _diff_all)


async def _diff_all(
    index: Index,
    diff: TableDiff,
    chunks: AsyncIterator[list[Row]],
    add: Callable[[Sequence[Row]], None] | None = None,
    commit: Callable[[], DiffStats] | None = None,
) -> DiffStats:
    """Feed the chunks to `add` (diff.add_chunk) and end with `commit` (diff.commit)."""
    # The next chunk is fetched while the index thread diffs the previous one.
    pending: Awaitable[None] | None = None
    try:
        async for rows in chunks:
            crash_point("fetched")
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(index.call(add or diff.add_chunk, rows))
        if pending is not None:
            await pending
            pending = None
        return await index.call(commit or diff.commit)
    except BaseException:
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending
        await index.call(diff.abort)
        raise

