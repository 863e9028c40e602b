"""The uploader: drains the queue to the store, one batch at a time, in order per table.

A batch is acked only after the store answered that it applied it, or had applied it before.
Network errors, timeouts, 5xx and 429 are retried with capped exponential backoff and jitter,
honouring Retry-After. A batch the store refuses with a 4xx is parked as failed and blocks the
later batches of its table, which wait in order; other tables keep flowing. A refused token
or a wrong URL stops the drain with the batch still pending.
"""

from __future__ import annotations

import asyncio
import logging

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

from manta_async.errors import RejectedError, TransportError
from manta_async.faults import crash_point
from manta_async.queue.batchqueue import BatchQueue, Taken
from manta_async.transport import DrainReport
from manta_async.transport.client import Applied, StoreClient

log = logging.getLogger(__name__)

_POLL_S = 1.0


class _Stopped(Exception):
    """The drain was asked to stop while it waited to retry."""


class Uploader:
    """Sends queued batches through a `StoreClient` and acks them."""

    def __init__(
        self,
        queue: BatchQueue,
        client: StoreClient,
        *,
        retry_for_s: float | None,
        max_backoff_s: float,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.queue = queue
        self.client = client
        self.retry_for_s = retry_for_s
        self.stop = stop or asyncio.Event()
        self._backoff = wait_exponential(multiplier=0.2, max=max_backoff_s) + wait_random(0, 0.5)

    async def drain(self, *, follow: bool = False) -> DrainReport:
        """Send every pending batch; with `follow`, keep waiting for new ones until stopped."""
        report = DrainReport()
        blocked = await self.queue.call(self.queue.blocked_tables)
        after = 0
        while not self.stop.is_set():
            found = await self.queue.call(self.queue.next_pending, after)
            if found is None:
                if not follow:
                    break
                await self._pause(_POLL_S)
                blocked = await self.queue.call(self.queue.blocked_tables)
                after = 0
                continue
            after, batch = found
            if batch["table"] in blocked:
                continue
            if not await self._deliver(after, report, blocked):
                break
        return report

    async def _deliver(self, pqid: int, report: DrainReport, blocked: set[str]) -> bool:
        # Returns False when the drain must stop.
        taken = await self.queue.call(self.queue.take, pqid)
        try:
            applied = await self._send(taken)
        except (_Stopped, TransportError) as exc:
            await self.queue.call(self.queue.release, pqid)
            if isinstance(exc, TransportError):
                report.unreachable = str(exc)
                log.error("store unreachable, %s stays queued: %s", _name(taken), exc)
            return False
        except RejectedError as exc:
            if exc.fatal:
                await self.queue.call(self.queue.release, pqid)
                report.refused = str(exc)
                log.error("%s", exc)
                return False
            await self.queue.call(self.queue.fail, pqid, str(exc))
            blocked.add(taken.table)
            report.parked += 1
            log.error("parked %s: %s", _name(taken), exc)
            return True

        crash_point("uploaded")
        await self.queue.call(self.queue.ack, pqid)
        crash_point("acked")
        if applied == "applied":
            report.applied += 1
        else:
            report.duplicates += 1
        log.info("%s %s (%d changes, batch %s)", applied, _name(taken), taken.rows, taken.batch_id)
        return True

    async def _send(self, taken: Taken) -> Applied:
        stop = stop_never if self.retry_for_s is None else stop_before_delay(self.retry_for_s)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransportError),
            stop=stop,
            wait=self._wait,
            sleep=self._pause_or_stop,
            before_sleep=self._log_retry,
            reraise=True,
        )
        applied: Applied = "applied"
        async for attempt in retrying:
            with attempt:
                applied = await self.client.send(taken.table, taken.seq, taken.payload)
        return applied

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TransportError) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return float(self._backoff(state))

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait_s = state.next_action.sleep if state.next_action else 0.0
        log.warning("attempt %d failed, retrying in %.1fs: %s", state.attempt_number, wait_s, exc)

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _pause_or_stop(self, seconds: float) -> None:
        await self._pause(seconds)
        if self.stop.is_set():
            raise _Stopped


def _name(taken: Taken) -> str:
    return f"batch {taken.seq} of table {taken.table!r}"
