"""SQLite read by buckets of keys: the agent hashes the rows as it reads them.

SQLite has no hash function the sqlite3 module can call without loading an extension, so
`SqliteSource.read_buckets` hashes each row in Python, from the `repr` of the tuple the module
returns. That text is a Python literal of values that are only ever None, int, float, str and
bytes, so two different rows never give the same text: a float is written with every digit
that tells it apart (and -0.0 apart from 0.0), a string with its quotes and escapes, and an
integer never looks like a float. The row hash is 64 bits of a BLAKE2b of that text; the
key hash, 32 bits of a BLAKE2b of the key's text, or for a key of one integer its product
with an odd constant.

The sums of a read are made in one pass over the rows, at the finest bucket width the index
uses; every coarser or narrower sum the run asks for is then folded from them without another
pass. The pass costs more than the database's own aggregate would (each row still crosses
into Python), but less than encoding and looking up every row, and a bucket whose sum did not
move is never encoded at all.
"""

from __future__ import annotations

import asyncio
import sqlite3
from array import array
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from hashlib import blake2b
from itertools import islice
from operator import itemgetter

import aiosqlite

from manta_async.extract import Origin
from manta_async.extract.base import Buckets, BucketSum, Column, Row

FINE_BITS = 20
"""The widest bucket number a read is asked for (MAX_BITS in diff/buckets.py)."""
_U64 = 0xFFFFFFFFFFFFFFFF
_SPREAD = 0x9E3779B97F4A7C15
_SUM_CHUNK = 20_000


def key_hash(key: object) -> int:
    """The 32-bit key hash of a row's key (see `SqliteBucketRead.key_of`)."""
    if type(key) is int:
        # Most keys are one integer: multiplied by an odd constant, its top bits spread
        # neighbouring keys over all buckets, for a fraction of a BLAKE2b's cost.
        return ((key * _SPREAD) & _U64) >> 32
    return int.from_bytes(blake2b(repr(key).encode(), digest_size=4).digest(), "big")


def row_hash(row: Row) -> int:
    """The 64-bit row hash of a row, signed as the index keeps it."""
    digest = blake2b(repr(row).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SqliteBucketRead:
    """`BucketRead` on one open read transaction of a SQLite file."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        sql: str,
        columns: list[Column],
        key: list[str] | None,
        origin: Origin,
        cursor: aiosqlite.Cursor,
    ) -> None:
        self._conn = conn
        self._sql = sql.strip().rstrip(";")
        self._columns = columns
        names = [column.name for column in columns]
        # A key column the SELECT lacks is reported by the diff before any read.
        self.key_of: Callable[[Row], object] | None = None
        """A row's key: one value, or a tuple of several; None for the whole row."""
        if key is not None and set(key) <= set(names):
            self.key_of = itemgetter(*[names.index(name) for name in key])
        self._origin = origin
        self._fine: tuple[array[int], array[int]] | None = None
        self._cursor: aiosqlite.Cursor | None = cursor
        """The SELECT as run for its columns: the first pass over the rows reads it."""

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def count(self) -> int:
        try:
            cursor = await self._conn.execute(f"SELECT count(*) FROM ({self._sql})")
            (rows,) = await cursor.fetchone() or (0,)
            await cursor.close()
        except sqlite3.Error as exc:
            raise self._origin.query_failed(str(exc)) from exc
        return int(rows)

    async def sums(
        self, bits: int, within: Buckets | None = None
    ) -> AsyncIterator[list[BucketSum]]:
        if not 0 < bits <= FINE_BITS:
            raise ValueError(f"bits must be from 1 to {FINE_BITS} (got {bits})")
        if self._fine is None:
            self._fine = await self._sum_fine()
        # In chunks, as a database sends them: a million buckets at once would be a list of
        # a million tuples.
        folded = _folded(*self._fine, bits, within)
        while chunk := list(islice(folded, _SUM_CHUNK)):
            yield chunk

    async def _sum_fine(self) -> tuple[array[int], array[int]]:
        counts = array("q", [0]) * (1 << FINE_BITS)
        sums = array("Q", [0]) * (1 << FINE_BITS)
        async for rows in self._chunks(5000):
            await asyncio.to_thread(self._add_sums, rows, counts, sums)
        return counts, sums

    def _add_sums(self, rows: list[Row], counts: array[int], sums: array[int]) -> None:
        # Once per row of the table: key_hash and row_hash written out, their names bound.
        shift = 32 - FINE_BITS
        key_of, hashed, from_bytes = self.key_of, blake2b, int.from_bytes
        for row in rows:
            key = row if key_of is None else key_of(row)
            if type(key) is int:
                bucket = ((key * _SPREAD) & _U64) >> (64 - FINE_BITS)
            else:
                text = repr(key).encode()
                bucket = from_bytes(hashed(text, digest_size=4).digest(), "big") >> shift
            digest = hashed(repr(row).encode(), digest_size=8).digest()
            counts[bucket] += 1
            sums[bucket] = (sums[bucket] + from_bytes(digest, "big")) & _U64

    async def rows(
        self, bits: int, only: Sequence[int] | None, chunk_rows: int
    ) -> AsyncIterator[list[Row]]:
        wanted = None if only is None else set(only)
        async for rows in self._chunks(chunk_rows):
            hashed = await asyncio.to_thread(self._hashed_rows, rows, bits, wanted)
            if hashed:
                yield hashed

    def _hashed_rows(self, rows: list[Row], bits: int, wanted: set[int] | None) -> list[Row]:
        shift = 32 - bits
        key_of = self.key_of
        kept: list[Row] = []
        for row in rows:
            hashed = key_hash(row if key_of is None else key_of(row))
            if wanted is None or hashed >> shift in wanted:
                kept.append((hashed, row_hash(row), *row))
        return kept

    async def _chunks(self, chunk_rows: int) -> AsyncIterator[list[Row]]:
        # A short chunk means SQLite said the result is complete; an error raises instead.
        try:
            cursor, self._cursor = self._cursor, None
            if cursor is None:
                cursor = await self._conn.execute(self._sql)
            while True:
                rows = [tuple(row) for row in await cursor.fetchmany(chunk_rows)]
                if rows:
                    yield rows
                if len(rows) < chunk_rows:
                    break
            await cursor.close()
        except (sqlite3.Error, ValueError) as exc:
            raise self._origin.query_failed(str(exc)) from exc


def _folded(
    counts: array[int], sums: array[int], bits: int, within: Buckets | None
) -> Iterator[BucketSum]:
    # A bucket of `bits` bits is a run of adjacent fine buckets; `within` keeps the buckets
    # under some (wider) buckets only.
    width = 1 << (FINE_BITS - bits)
    if width == 1 and within is None:
        yield from ((bucket, n, sums[bucket]) for bucket, n in enumerate(counts) if n)
        return
    if within is None:
        buckets: Iterable[int] = range(1 << bits)
    else:
        within_bits, under = within
        per = 1 << (bits - within_bits)
        buckets = (b * per + i for b in sorted(under) for i in range(per))
    for bucket in buckets:
        start = bucket * width
        n = sum(counts[start : start + width])
        if n:
            yield bucket, n, sum(sums[start : start + width]) & _U64
