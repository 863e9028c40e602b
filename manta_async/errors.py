"""The exceptions manta-async raises on purpose.

Every expected failure is a subclass of `MantaError`, and its message says what failed, why,
and what to do next, so the command line can print it as one line without a traceback.

    MantaError
    ├── ConfigError            the config file is missing, unreadable or invalid
    ├── SourceError            a source database could not be reached or read
    │   └── EncodeError        a value of a type the canonical encoding does not know
    ├── TableError             one table's run was abandoned (duplicate keys, mass delete, ...)
    ├── StateError             the state directory is full or damaged
    │   └── LockedError        another process holds the state directory's lock
    ├── QueueError             the durable queue could not be opened or written
    ├── UploadError            a batch did not reach the store
    │   ├── TransportError     network failure, timeout, 5xx or 429: retried, then left queued
    │   └── RejectedError      the store refused the request (4xx): parked or fatal
    └── StoreError             the receiving store could not apply or serve a batch

Driver, SQLite and aiohttp errors are converted to these at the boundary, keeping the original
as `__cause__`.
"""

from __future__ import annotations


class MantaError(Exception):
    """Root of every error manta-async raises on purpose."""


class ConfigError(MantaError):
    """The configuration file is missing, unreadable or invalid."""


class SourceError(MantaError):
    """A source database could not be reached, or a SELECT could not be read to its end."""


class EncodeError(SourceError):
    """A source returned a value the canonical encoding does not know how to carry."""


class TableError(MantaError):
    """One table's run was abandoned; the index and the queue stay as they were."""

    def __init__(self, table: str, message: str) -> None:
        super().__init__(f"table {table!r}: {message}")
        self.table = table


class StateError(MantaError):
    """The state directory is locked by another process, full, or damaged."""


class LockedError(StateError):
    """Another manta-async process holds a lock on the same state directory."""


class QueueError(MantaError):
    """The durable queue could not be opened, read or written."""


class UploadError(MantaError):
    """A batch did not reach the store."""


class TransportError(UploadError):
    """The store could not be reached or answered with a retryable status (5xx, 429)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RejectedError(UploadError):
    """The store refused a request with a 4xx status.

    `fatal` is true when the refusal is not the batch's fault (a wrong token or URL): the
    batch stays queued and the drain stops. Otherwise the batch is parked as failed.
    """

    def __init__(self, message: str, status: int, fatal: bool) -> None:
        super().__init__(message)
        self.status = status
        self.fatal = fatal


class StoreError(MantaError):
    """The receiving store could not apply or serve a batch."""


def is_damage(exc: BaseException) -> bool:
    """True when SQLite found a file not to be a sound database, rather than full or busy.

    Errors raised by SQLite carry their result code; one raised by hand (a failed
    quick_check) has none and is damage.
    """
    import sqlite3

    code = getattr(exc, "sqlite_errorcode", None)
    return code is None or code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def first_problem(report: str) -> str:
    """SQLite's quick_check report, which may run to hundreds of lines, as one line: the
    first problem and how many more there are."""
    lines = [line for line in report.splitlines() if line.strip() and "*** in database" not in line]
    if len(lines) <= 1:
        return lines[0] if lines else report
    return f"{lines[0]}, and {len(lines) - 1} more problems"
