"""The agent's two ways of working: one run from cron, or a long-lived drainer.

`run_once` reads and stages the tables under the extract lock, then drains the queue if no
other process does; if `serve` is draining, it waits for its own batches to be acked.
`serve` holds the drain lock, sends batches as they come, and can also run the tables on a
schedule. Exit codes are documented in docs/cli.md and kept here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from manta_async.config import Config
from manta_async.diff.index import Index
from manta_async.errors import StateError
from manta_async.locks import DRAIN, EXTRACT, StateLock
from manta_async.queue.batchqueue import ACKED, FAILED, IN_FLIGHT, PENDING, BatchQueue
from manta_async.sync import SyncResult, sync_tables
from manta_async.transport import DrainReport

if TYPE_CHECKING:
    from manta_async.transport.uploader import Uploader

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_QUEUED = 3
EXIT_PARKED = 4
EXIT_TABLE_FAILED = 5
EXIT_LOCKED = 6

_REFUSED_PAUSE_S = 60.0


@dataclass
class RunReport:
    """What `run_once` did, and the exit code it stands for."""

    sync: SyncResult | None = None
    drain: DrainReport | None = None
    handed_over: bool = False
    """True when a running `serve` drains the queue and this run only waited for it."""
    counts: dict[str, int] = field(default_factory=dict)
    own_waiting: int | None = None
    """For a run handed over to `serve`: how many of its own batches were not yet delivered.
    The queue may hold serve's own batches too, which are not this run's concern."""

    @property
    def waiting(self) -> int:
        if self.own_waiting is not None:
            return self.own_waiting
        return self.counts.get("pending", 0) + self.counts.get("in flight", 0)

    @property
    def exit_code(self) -> int:
        if self.drain is not None and self.drain.refused:
            return EXIT_ERROR
        if self.counts.get(FAILED, 0):
            return EXIT_PARKED
        if self.sync is not None and self.sync.failed:
            return EXIT_TABLE_FAILED
        if self.waiting:
            return EXIT_QUEUED
        return EXIT_OK


async def run_once(
    config: Config,
    tables: list[str],
    *,
    drain: bool = True,
    wait_s: float | None = None,
    allow_mass_delete: bool = False,
) -> RunReport:
    """Sync the named tables once, then deliver what waits in the queue."""
    state_dir = config.state_dir
    report = RunReport()

    # Read and stage under the extract lock; the queue is only put into here.
    with StateLock(state_dir, EXTRACT):
        async with Index(state_dir / "index.db") as index:
            async with BatchQueue(state_dir, drain=False) as queue:
                report.sync = await sync_tables(
                    config, index, queue, tables, allow_mass_delete=allow_mass_delete
                )

    if not drain:
        report.counts = await queue_counts(config)
        return report

    # Deliver, unless `serve` already does: then wait for it to deliver our batches.
    drain_lock = StateLock(state_dir, DRAIN)
    if drain_lock.try_acquire():
        try:
            report.drain = await drain_queue(config, retry_for_s=config.store.retry_for_s)
        finally:
            drain_lock.release()
    else:
        timeout_s = config.store.retry_for_s if wait_s is None else wait_s
        report.drain = await _wait_for(config, drain_lock, report.sync.queued, timeout_s)
        report.handed_over = report.drain is None
        if report.handed_over:
            report.own_waiting = await _not_delivered(config, report.sync.queued)
    report.counts = await queue_counts(config)
    return report


async def _not_delivered(config: Config, pqids: list[int]) -> int:
    async with BatchQueue(config.state_dir, drain=False) as queue:
        statuses = await queue.call(queue.statuses, pqids)
    return sum(1 for p in pqids if statuses.get(p, ACKED) not in (ACKED, FAILED))


async def mark_resync(config: Config, tables: list[str]) -> None:
    """Have the next run of each table send it in full; the store then replaces its copy.

    The tables' batches not yet sent are dropped: the full resend carries their changes, and
    a parked one would otherwise hold it back.
    """
    with StateLock(config.state_dir, EXTRACT):
        async with Index(config.state_dir / "index.db") as index:
            async with BatchQueue(config.state_dir, drain=False) as queue:
                for table in tables:
                    await index.call(index.mark_resync, table)
                    dropped = await queue.call(queue.drop_unsent, table)
                    if dropped:
                        log.info("table %r: %d unsent batches replaced by the resend", table,
                                 dropped)  # fmt: skip


async def drain_queue(config: Config, *, retry_for_s: float | None) -> DrainReport:
    """Send every pending batch once (the caller holds the drain lock)."""
    async with BatchQueue(config.state_dir, drain=True) as queue:
        counts = await queue.call(queue.counts)
        if not counts[PENDING] and not counts[IN_FLIGHT]:
            return DrainReport()

        # Loaded only when a batch waits: aiohttp is a fifth of the start-up of a run from
        # cron that finds nothing changed.
        from manta_async.transport.client import StoreClient
        from manta_async.transport.uploader import Uploader

        async with StoreClient(config.store, config.agent.name) as client:
            uploader = Uploader(
                queue, client, retry_for_s=retry_for_s, max_backoff_s=config.store.max_backoff_s
            )
            report = await uploader.drain()
        await queue.call(queue.clear_acked)
    return report


async def queue_counts(config: Config) -> dict[str, int]:
    async with BatchQueue(config.state_dir, drain=False) as queue:
        return await queue.call(queue.counts)


async def _wait_for(
    config: Config, drain_lock: StateLock, pqids: list[int], timeout_s: float
) -> DrainReport | None:
    """Wait for the draining process to deliver `pqids`; drain them here if it goes away
    first (it may have ended its drain just before they were queued)."""
    deadline = time.monotonic() + timeout_s
    locked = False
    async with BatchQueue(config.state_dir, drain=False) as queue:
        while pqids and time.monotonic() < deadline:
            statuses = await queue.call(queue.statuses, pqids)
            pqids = [p for p in pqids if statuses.get(p, ACKED) not in (ACKED, FAILED)]
            locked = bool(pqids) and drain_lock.try_acquire()
            if locked or not pqids:
                break
            await asyncio.sleep(0.5)

    if not locked:
        return None
    try:
        return await drain_queue(config, retry_for_s=max(0.0, deadline - time.monotonic()))
    finally:
        drain_lock.release()


async def serve(config: Config, *, every_s: float | None, stop: asyncio.Event) -> None:
    """Drain the queue until `stop` is set; with `every_s`, also sync all tables that often."""
    from manta_async.transport.client import StoreClient
    from manta_async.transport.uploader import Uploader

    state_dir = config.state_dir
    drain_lock = StateLock(state_dir, DRAIN)
    drain_lock.acquire()
    try:
        schedule = f", syncing every table every {every_s:g}s" if every_s else ""
        log.info("serving: draining %s to %s%s", state_dir, config.store.url, schedule)
        async with BatchQueue(state_dir, drain=True) as queue:
            async with StoreClient(config.store, config.agent.name) as client:
                uploader = Uploader(
                    queue,
                    client,
                    retry_for_s=None,
                    max_backoff_s=config.store.max_backoff_s,
                    stop=stop,
                )
                tasks = [asyncio.create_task(_drain_forever(uploader, stop))]
                if every_s is not None:
                    tasks.append(asyncio.create_task(_sync_every(config, queue, every_s, stop)))
                await asyncio.gather(*tasks)
    finally:
        drain_lock.release()


async def _drain_forever(uploader: Uploader, stop: asyncio.Event) -> None:
    while not stop.is_set():
        report = await uploader.drain(follow=True)
        if report.refused:
            log.error("the store refuses this agent; trying again in %.0fs", _REFUSED_PAUSE_S)
            await _sleep_unless(stop, _REFUSED_PAUSE_S)


async def _sync_every(
    config: Config, queue: BatchQueue, every_s: float, stop: asyncio.Event
) -> None:
    extract_lock = StateLock(config.state_dir, EXTRACT)
    while not stop.is_set():
        started = time.monotonic()
        try:
            extract_lock.acquire()
        except StateError as exc:
            log.warning("skipping this scheduled run: %s", exc)
        else:
            try:
                async with Index(config.state_dir / "index.db") as index:
                    await sync_tables(config, index, queue, list(config.tables))
            except Exception:
                log.exception("the scheduled run failed; the next one runs as planned")
            finally:
                extract_lock.release()
        await _sleep_unless(stop, max(0.0, every_s - (time.monotonic() - started)))


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
