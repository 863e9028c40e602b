"""Reading only what changed: the source hashes its rows, summed by buckets of keys.

Most runs find nothing changed, and reading every row to prove it costs as much as a full
export. When the source database can hash its own rows (`BucketSource`), a run instead

1. asks the database, in one read-only snapshot, for each bucket's row count and the sum of
   its 64-bit row hashes modulo 2**64 (a sum, so two copies of a row never cancel out);
2. compares them with the sums the index kept from the last run;
3. reads, in the same snapshot, only the rows of the buckets that differ, each with its key
   hash and row hash, and diffs them against the index as a full read would (`TableDiff`),
   looking for deletes only among the index rows of those buckets. The index keeps each row's
   source row hash too: a row of a table with a key whose key hash and row hash are those of
   an index row is that row, unchanged, by the argument below, and is not encoded at all;
4. commits the new sums with the index and the batches, in one transaction.

A row's bucket is the top bits of a 32-bit *key hash* the database computes from its key (from
the whole row for a keyless table); the index keeps every row's key hash, so the number of
buckets can follow the table's size. The database renders values for the row hash in a form
that never gives two different values the same text, so an unchanged bucket holds unchanged
rows (up to a 2**-64 chance per changed bucket). A changed bucket can still hold no change the
canonical encoding sees (a decimal's trailing zero): its rows are read and nothing is sent.

When more than `FALLBACK_SHARE` of the buckets differ, or nothing is known yet (first run,
new shape, another hash format), every row is read, as the plain stream does, and the sums
are recorded for the next run.
"""

from __future__ import annotations

import logging
import sqlite3
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from hashlib import blake2b

import orjson

from manta_async.diff.differ import DiffStats, TableDiff
from manta_async.diff.index import Index
from manta_async.extract.base import BucketRead, Buckets, BucketSum, Row
from manta_async.faults import crash_point

log = logging.getLogger(__name__)

HASH_FORMAT = 2
"""Changes whenever the SQL that hashes rows changes; older sums are then not compared."""
ROWS_PER_BUCKET = 4
MIN_BITS = 8
MAX_BITS = 20
FALLBACK_SHARE = 0.5
"""Above this share of differing buckets every row is read."""
COARSE_BITS = 12
"""A run first sums 2**12 coarse buckets, then the fine ones only under those that moved."""
NARROW_SHARE = 0.25
"""Above this share of moved coarse buckets, every row is summed finely."""
_U64 = 0xFFFFFFFFFFFFFFFF

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bucket_sums (
    tbl TEXT PRIMARY KEY,
    slot INTEGER NOT NULL,
    signature TEXT NOT NULL,
    bits INTEGER NOT NULL,
    counts BLOB NOT NULL,
    sums BLOB NOT NULL
)
"""

DiffAll = Callable[..., Awaitable[DiffStats]]


@dataclass
class BucketSums:
    """Row count and row hash sum of each of 2**bits buckets."""

    bits: int
    counts: array[int]
    sums: array[int]

    @classmethod
    def empty(cls, bits: int) -> BucketSums:
        size = 1 << bits
        return cls(bits, array("q", [0]) * size, array("Q", [0]) * size)

    def add(self, chunk: Sequence[BucketSum]) -> None:
        counts, sums = self.counts, self.sums
        for bucket, count, total in chunk:
            counts[bucket] += count
            sums[bucket] = (sums[bucket] + total) & _U64

    @property
    def rows(self) -> int:
        return sum(self.counts)

    def folded(self, bits: int) -> BucketSums:
        """The same sums over fewer, wider buckets."""
        # A wide bucket is a run of adjacent narrow ones: each is summed as one slice.
        width = 1 << (self.bits - bits)
        starts = range(0, 1 << self.bits, width)
        counts = array("q", [sum(self.counts[i : i + width]) for i in starts])
        sums = array("Q", [sum(self.sums[i : i + width]) & _U64 for i in starts])
        return BucketSums(bits, counts, sums)

    def replaced(self, part: BucketSums, coarse_bits: int, coarse: Sequence[int]) -> BucketSums:
        """These sums with the buckets under some coarse buckets taken from `part`."""
        counts, sums = array("q", self.counts), array("Q", self.sums)
        shift = self.bits - coarse_bits
        for bucket in coarse:
            low, high = bucket << shift, (bucket + 1) << shift
            counts[low:high] = part.counts[low:high]
            sums[low:high] = part.sums[low:high]
        return BucketSums(self.bits, counts, sums)

    def differing(self, other: BucketSums) -> list[int]:
        """The buckets whose count or sum differ; both must have the same number of them."""
        assert self.bits == other.bits
        if self.counts == other.counts and self.sums == other.sums:
            return []
        pairs = zip(self.counts, other.counts, self.sums, other.sums, strict=True)
        return [b for b, (n1, n2, s1, s2) in enumerate(pairs) if n1 != n2 or s1 != s2]


def choose_bits(rows: int) -> int:
    """How many bits of the key hash make the bucket of a table of `rows` rows."""
    bits = MIN_BITS
    while bits < MAX_BITS and (ROWS_PER_BUCKET << bits) < rows:
        bits += 1
    return bits


def key_hash_ranges(buckets: Sequence[int], bits: int) -> list[tuple[int, int]]:
    """The key hash ranges of some buckets, neighbours merged, bounds included."""
    shift = 32 - bits
    ranges: list[tuple[int, int]] = []
    for bucket in sorted(buckets):
        low, high = bucket << shift, ((bucket + 1) << shift) - 1
        if ranges and ranges[-1][1] + 1 == low:
            ranges[-1] = (ranges[-1][0], high)
        else:
            ranges.append((low, high))
    return ranges


# The index side


def signature(diff: TableDiff) -> str:
    """What the stored sums are only valid for: the hash format, the columns and the key."""
    return orjson.dumps(
        {"format": HASH_FORMAT, "columns": diff.columns_json, "key": diff.key}
    ).decode()


def salt(diff: TableDiff) -> int:
    """A 64-bit number of the signature, mixed into the source row hashes the index keeps."""
    return int.from_bytes(blake2b(signature(diff).encode(), digest_size=8).digest(), "big")


def load_sums(conn: sqlite3.Connection, diff: TableDiff) -> BucketSums | None:
    """The sums of the table's last run, if they describe its current index."""
    conn.execute(_SCHEMA)
    row = conn.execute(
        "SELECT slot, signature, bits, counts, sums FROM bucket_sums WHERE tbl = ?",
        (diff.table,),
    ).fetchone()
    if row is None or row[0] != diff.slot or row[1] != signature(diff):
        return None
    counts, sums = array("q"), array("Q")
    counts.frombytes(row[3])
    sums.frombytes(row[4])
    return BucketSums(row[2], counts, sums)


def save_sums(conn: sqlite3.Connection, diff: TableDiff, sums: BucketSums) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO bucket_sums (tbl, slot, signature, bits, counts, sums) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (diff.table, diff.slot, signature(diff), sums.bits, sums.counts.tobytes(),
         sums.sums.tobytes()),
    )  # fmt: skip


def forget_sums(conn: sqlite3.Connection, table: str) -> None:
    """Drop a table's sums, in the run's transaction: a read not by buckets changed its index
    without them, and a row changed back since would find its old bucket sum unchanged."""
    conn.execute(_SCHEMA)
    conn.execute("DELETE FROM bucket_sums WHERE tbl = ?", (table,))


# The run


@dataclass
class _Plan:
    bits: int
    new: BucketSums
    dirty: list[int] | None
    """The buckets to read; None to read every row."""
    from_rows: bool = False
    """Whether `new` is to be summed from the rows as they are read: a run reading every row
    without sums to compare has no use for the database's aggregate."""


async def diff_by_buckets(
    index: Index, diff: TableDiff, read: BucketRead, chunk_rows: int, diff_all: DiffAll
) -> DiffStats:
    """Run a started `diff` over the rows of the buckets whose sums moved; commit the sums."""
    diff.source_salt = salt(diff)
    try:
        stored = await index.call(_prepare, index, diff)
        plan = await _plan(read, stored)
    except BaseException:
        # The diff started the index's transaction; nothing has been read into it yet.
        await index.call(diff.abort)
        raise
    if plan.dirty is None:
        rows = read.rows(plan.bits, None, chunk_rows)
        if plan.from_rows:
            rows = _summed(rows, plan.new)
    else:
        diff.scope = key_hash_ranges(plan.dirty, plan.bits)
        rows = read.rows(plan.bits, plan.dirty, chunk_rows) if plan.dirty else _no_rows()

    def commit() -> DiffStats:
        # Built once the rows are in: faster than growing it row by row on a first run. It
        # holds the source row hashes too, so a bucket read's rows are matched from it alone;
        # an index made before them had the key hash only.
        idx = diff.idx_table
        index.conn.execute(f"DROP INDEX IF EXISTS {idx}_key_hash")
        index.conn.execute(
            f"CREATE INDEX IF NOT EXISTS {idx}_key_src ON {idx} (key_hash, src_hash)"
        )
        save_sums(index.conn, diff, plan.new)
        return diff.commit()

    stats = await diff_all(index, diff, rows, add=diff.add_bucket_chunk, commit=commit)
    _log_plan(diff.table, plan, stats)
    return stats


def _prepare(index: Index, diff: TableDiff) -> BucketSums | None:
    # Inside the run's transaction: the index rows get a column for their key hash.
    conn = index.conn
    idx = diff.idx_table
    names = [row[1] for row in conn.execute(f"PRAGMA table_info({idx})")]
    if "key_hash" not in names:
        conn.execute(f"ALTER TABLE {idx} ADD COLUMN key_hash INTEGER")
    if "src_hash" not in names:
        conn.execute(f"ALTER TABLE {idx} ADD COLUMN src_hash INTEGER")
    return load_sums(conn, diff)


async def _plan(read: BucketRead, stored: BucketSums | None) -> _Plan:
    rows = stored.rows if stored is not None else await read.count()
    bits = choose_bits(rows)
    if stored is not None and abs(bits - stored.bits) <= 2:
        # A table keeps its buckets until it is four times larger or smaller: growing them
        # means reading every row once.
        bits = stored.bits
    if stored is None or stored.bits < bits:
        return _Plan(bits, BucketSums.empty(bits), None, from_rows=True)

    old = stored if stored.bits == bits else stored.folded(bits)
    new = await _current_sums(read, old)
    dirty = old.differing(new)
    if len(dirty) > FALLBACK_SHARE * (1 << bits):
        return _Plan(bits, new, None)
    return _Plan(bits, new, dirty)


async def _current_sums(read: BucketRead, old: BucketSums) -> BucketSums:
    # Coarse sums first: an unchanged coarse bucket holds unchanged fine buckets, and the
    # database sums a few thousand buckets faster than a million. Only the coarse buckets that
    # moved are summed finely, unless most of them moved.
    coarse_bits = min(COARSE_BITS, old.bits)
    if coarse_bits == old.bits:
        return await _sums(read, old.bits)

    coarse = await _sums(read, coarse_bits)
    moved = old.folded(coarse_bits).differing(coarse)
    if not moved:
        return old
    if len(moved) > NARROW_SHARE * (1 << coarse_bits):
        return await _sums(read, old.bits)
    part = await _sums(read, old.bits, (coarse_bits, moved))
    return old.replaced(part, coarse_bits, moved)


async def _sums(read: BucketRead, bits: int, within: Buckets | None = None) -> BucketSums:
    sums = BucketSums.empty(bits)
    async for chunk in read.sums(bits, within):
        # Read from the source before the index saw it, like a chunk of rows.
        crash_point("fetched")
        sums.add(chunk)
    return sums


async def _summed(rows: AsyncIterator[list[Row]], sums: BucketSums) -> AsyncIterator[list[Row]]:
    # Each row of a bucket read starts with its key hash and its row hash.
    shift = 32 - sums.bits
    async for chunk in rows:
        sums.add([(row[0] >> shift, 1, row[1]) for row in chunk])
        yield chunk


async def _no_rows() -> AsyncIterator[list[Row]]:
    return
    yield


def _log_plan(table: str, plan: _Plan, stats: DiffStats) -> None:
    buckets = 1 << plan.bits
    if plan.dirty is None:
        log.info("table %r: every row read (%d buckets recorded)", table, buckets)
    else:
        log.info(
            "table %r: %d of %d buckets changed, %d rows read, %d of them diffed",
            table, len(plan.dirty), buckets, stats.rows, stats.diffed,
        )  # fmt: skip
