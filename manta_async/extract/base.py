"""What every extractor offers: a source that streams one SELECT's rows in chunks.

    async with await connect(source_config) as source:
        async with source.read("SELECT ...", chunk_rows=5000) as result:
            result.columns                      # names and database types
            async for rows in result.chunks():  # lists of tuples, at most chunk_rows long
                ...

`chunks()` ends normally only when the database said the result is complete; a lost
connection, a timeout or a server error raises `SourceError` instead, so a partial read can
never be mistaken for a whole one. Each read runs in one read-only snapshot of the database.

A source that can hash its own rows also offers `read_buckets` (see `BucketSource` and
manta_async/diff/buckets.py): the database sums row hashes per bucket of keys, and only the
rows of the buckets whose sums moved are read, all in one snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Row = tuple[Any, ...]


@dataclass(frozen=True)
class Column:
    """One column of a result: its name and the type the database reports for it."""

    name: str
    type: str
    """The database's own type name in lower case ("int4", "numeric", "varchar", ...), or ""
    where the database does not say (SQLite expressions)."""


class Result(Protocol):
    """One SELECT being read."""

    @property
    def columns(self) -> list[Column]: ...

    def chunks(self) -> AsyncIterator[list[Row]]: ...


class Source(Protocol):
    """An open connection to one source database."""

    def read(self, sql: str, chunk_rows: int) -> AbstractAsyncContextManager[Result]: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Source: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


BucketSum = tuple[int, int, int]
"""(bucket, rows in it, sum of their 64-bit row hashes modulo 2**64)."""

Buckets = tuple[int, Sequence[int]]
"""Some of the 2**bits buckets: (bits, bucket numbers)."""


class BucketRead(Protocol):
    """One SELECT read by buckets of keys, every call in the same snapshot.

    A row's *key hash* is a 32-bit hash the database computes from the row's key columns (from
    the whole row for a keyless table); with 2**bits buckets, its top `bits` bits are its
    bucket. The row hash is a 64-bit hash of a rendering of every value that marks NULLs and
    never gives two different values the same text.
    """

    @property
    def columns(self) -> list[Column]: ...

    async def count(self) -> int:
        """Return how many rows the SELECT returns."""
        ...

    def sums(self, bits: int, within: Buckets | None = None) -> AsyncIterator[list[BucketSum]]:
        """Yield the non-empty buckets, in chunks; with `within`, only of the rows in those
        (usually wider) buckets."""
        ...

    def rows(
        self, bits: int, only: Sequence[int] | None, chunk_rows: int
    ) -> AsyncIterator[list[Row]]:
        """Yield the rows of the buckets `only` (every row if None), each as its key hash and
        its row hash (a signed 64-bit integer) followed by the row's values; end only when the
        database said the result is complete."""
        ...


@runtime_checkable
class BucketSource(Protocol):
    """A source whose database can hash its own rows."""

    def read_buckets(
        self, sql: str, key: list[str] | None
    ) -> AbstractAsyncContextManager[BucketRead]: ...
