"""Named crash points, for the tests that kill the agent between two steps.

`crash_point("queued")` does nothing unless the environment variable MANTA_CRASH_AT names
that point: ``MANTA_CRASH_AT=queued`` kills the process the first time it gets there,
``MANTA_CRASH_AT=queued:3`` the third time. The kill is SIGKILL where the platform has it,
so no cleanup code runs, as on a power cut; elsewhere the process exits at once.

The points, in the order a run passes them:

    fetched           a chunk of rows (or of bucket sums) was read from a source, before
                      the index saw it
    index-committed   a table's index and outbox were committed, before any batch was queued
    queued            a batch was put into the queue, before the outbox forgot it
    uploaded          the store answered that it applied a batch, before the queue acked it
    acked             the queue acked a batch
"""

from __future__ import annotations

import os
import signal

_ENV = "MANTA_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here if MANTA_CRASH_AT names this point (and this is the hit it counts to)."""
    wanted = os.environ.get(_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] < int(nth or 1):
        return
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(137)
