"""Locks on the state directory, so two processes never extract or drain at once.

- the *extract* lock is held while tables are read, diffed and staged: the index has one
  writer;
- the *drain* lock is held by the one process that takes batches from the queue, because
  persist-queue resets in-flight batches when a draining process opens it.

`run --once` takes the extract lock, then the drain lock if it is free; `serve` holds the
drain lock for its whole life and takes the extract lock for each scheduled run.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from manta_async.errors import LockedError

EXTRACT = "extract"
DRAIN = "drain"
_WHAT = {EXTRACT: "reading tables", DRAIN: "draining the queue"}


class StateLock:
    """One named lock in a state directory; released when the process dies, however."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.name = name
        self.path = state_dir / f"{name}.lock"
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.path))

    def acquire(self, timeout_s: float = 0) -> None:
        """Take the lock, waiting up to `timeout_s`; raise LockedError if it stays taken."""
        try:
            self._lock.acquire(timeout=timeout_s)
        except Timeout as exc:
            raise LockedError(
                f"another manta-async process is {_WHAT[self.name]} in {self.path.parent} "
                f"(lock {self.path}); wait for it to finish, or stop it"
            ) from exc

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
