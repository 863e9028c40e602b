"""One table's run: compare the rows of a complete read with the index and stage the changes.

A `TableDiff` holds one SQLite transaction on the index from `start` to `commit` or `abort`.
Each chunk of rows is encoded, hashed and looked up by key; new keys are inserts, keys whose
hash moved are updates. Which keys were seen is kept in a bitmap over the index's row ids, so
the run writes nothing for an unchanged row and memory stays small (one bit per indexed row).
Keys the read did not return are deletes, known only once the read is complete.

Changes are packed into batches as they appear and staged in the outbox in the same
transaction. Sequence numbers are given at commit time, deletes first, so a key that moved
(id 1 becomes id 3 with the same unique value) never collides at a store that checks uniques.

A table is sent in full, as a *snapshot*, on its first run, when its key or its shape (see
shape.py) changed, and when a resync was asked for: its index starts empty, every row is an
insert, and the batches are numbered as parts, the last of which tells the store to replace
its copy of the table with the parts, in one transaction.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from manta_async.diff import codec
from manta_async.diff.index import Index, TableState
from manta_async.diff.shape import describe_change, shape_of
from manta_async.errors import TableError
from manta_async.extract.base import Column, Row

_LOOKUP_KEYS = 10_000
_HALF = 1 << 63
_SPAN = 1 << 64
_INSERT = b'["insert",'
_UPDATE = b'["update",'
_DELETE = b'["delete",'
_PHASE_DELETE = 0
_PHASE_UPSERT = 1
MASS_DELETE_MIN_ROWS = 10
"""Tables with fewer rows before the run are never held back by max_delete_share."""


@dataclass
class DiffStats:
    """What one table's run found."""

    rows: int = 0
    diffed: int = 0
    """Rows encoded and compared with the index; a bucket read passes over the others."""
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    batches: int = 0
    seconds: float = 0.0
    snapshot: str | None = None
    """Why the run sent the table in full, if it did."""

    @property
    def changes(self) -> int:
        return self.inserts + self.updates + self.deletes


@dataclass
class _Seen:
    """A key seen more than once in this run (or a keyless row whose count may change)."""

    rowid: int
    stored_n: int
    count: int
    row: bytes


@dataclass
class _BatchBuilder:
    phase: int
    changes: list[bytes] = field(default_factory=list)
    size: int = 0


class TableDiff:
    """The open run of one table against the index; see the module docstring."""

    def __init__(
        self,
        index: Index,
        table: str,
        key: list[str] | None,
        columns: list[Column],
        batch_rows: int,
        batch_bytes: int,
        *,
        max_delete_share: float | None = None,
    ) -> None:
        self.index = index
        self.max_delete_share = max_delete_share
        """Refuse a run deleting more than this share of the table's rows; None: never."""
        self.table = table
        self.key = key
        self.columns = columns
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.stats = DiffStats()
        self._key_pos = self._key_positions()
        self._started = time.monotonic()
        self._state: TableState | None = None
        self._old_max = 0
        self._old_rows = 0
        self._bitmap = bytearray()
        self._matched = 0
        self._next_seq = 0
        self._seen_again: dict[bytes, _Seen] = {}
        self._upserts = _BatchBuilder(_PHASE_UPSERT)
        self._columns_json = [{"name": c.name, "type": c.type} for c in columns]
        self._header = orjson.dumps(
            {"format": 1, "columns": self._columns_json, "key": key or []}
        )
        self.snapshot: str | None = None
        """Why this run sends the table in full (first run, new shape, ...), or None."""
        self.scope: list[tuple[int, int]] | None = None
        """The key hash ranges the read covered (see buckets.py); None when it read every
        row. Deletes are looked for only among the index rows in them."""
        self.source_hashes = False
        """Whether the index kept source row hashes when the run started: a bucket read writes
        them, and any other read forgets those of the rows it changes."""
        self.source_salt = 0
        """Added to every source row hash the index keeps (see `add_bucket_chunk`)."""

    def _key_positions(self) -> list[int] | None:
        if self.key is None:
            return None
        names = [c.name for c in self.columns]
        missing = [k for k in self.key if k not in names]
        if missing:
            raise TableError(
                self.table,
                f"key column(s) {', '.join(missing)} are not in the SELECT's result "
                f"(columns: {', '.join(names)}); fix 'key' or the 'sql' of the table",
            )
        if len(set(names)) != len(names):
            raise TableError(self.table, "the SELECT returns two columns with the same name")
        return [names.index(k) for k in self.key]

    # The transaction

    def start(self) -> None:
        """Open the run's transaction; decide whether the table must be sent in full."""
        conn = self.index.conn
        conn.execute("BEGIN IMMEDIATE")
        state = self.index.table_state(self.table)
        self.snapshot = self._snapshot_reason(state)
        if self.snapshot is not None:
            # A full resend: every row against an empty index, and the store swaps its copy
            # for the new one when the last batch arrives.
            state = self.index.new_slot(self.table)
        assert state is not None, "a table the index does not know is always sent in full"
        self._state = state
        idx = state.idx_table
        self._old_max = conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {idx}").fetchone()[0]
        self._old_rows = conn.execute(f"SELECT count(*) FROM {idx}").fetchone()[0]
        self._bitmap = bytearray((self._old_max >> 3) + 1)
        self.source_hashes = any(row[1] == "src_hash" for row in conn.execute(
            f"PRAGMA table_info({idx})"
        ))  # fmt: skip

    def _snapshot_reason(self, state: TableState | None) -> str | None:
        if state is None:
            return "first run"
        if state.resync:
            return "a resync was asked for"
        if state.key != self.key:
            return f"its key changed from {state.key} to {self.key}"
        old_shape = shape_of(state.columns)
        new_shape = shape_of(self._columns_json)
        if old_shape != new_shape:
            return f"its columns changed: {describe_change(old_shape, new_shape)}"
        return None

    def abort(self) -> None:
        """Forget this run: the index and the outbox stay exactly as before it."""
        if self.index.conn.in_transaction:
            self.index.conn.execute("ROLLBACK")

    def commit(self) -> DiffStats:
        """Find the deletes, give the staged batches their sequence numbers, and commit."""
        try:
            self._fail_on_duplicates()
            self._finish_seen_again()
            self._flush(self._upserts)
            self._stage_deletes()
            self._number_batches()
            self._record_table()
            self.index.conn.execute("COMMIT")
        except BaseException:
            self.abort()
            raise
        self.stats.seconds = time.monotonic() - self._started
        self.stats.snapshot = self.snapshot
        return self.stats

    # Chunks

    def add_chunk(
        self,
        rows: Sequence[Row],
        key_hashes: Sequence[int] | None = None,
        source_hashes: Sequence[int] | None = None,
    ) -> None:
        """Compare one chunk of the read with the index; a bucket read also gives, one per
        row, the key hashes and source row hashes the index keeps (see buckets.py)."""
        entries = self._encode(rows, key_hashes, source_hashes)
        found = self._lookup(list(entries))
        inserts: list[tuple[bytes, bytes, int, int | None, int | None]] = []
        updates: list[tuple[bytes, int]] = []
        hashed: list[tuple[int | None, int | None, int]] = []
        for key, (row, digest, count, key_hash, source_hash) in entries.items():
            hit = found.get(key)
            if hit is None:
                inserts.append((key, digest, count, key_hash, source_hash))
                self._emit(_INSERT, key, row, count)
                self.stats.inserts += 1
                if self.key is not None and count > 1:
                    self._seen_again[key] = _Seen(0, 1, count, row)
                continue
            rowid, old_digest, stored_n = hit
            if key_hashes is not None:
                hashed.append((key_hash, source_hash, rowid))
            if rowid > self._old_max or self._bit(rowid):
                self._again(key, rowid, stored_n, count, row)
                continue
            self._set_bit(rowid)
            if self.key is None:
                if stored_n != 1 or count != 1:
                    self._seen_again[key] = _Seen(rowid, stored_n, count, row)
            elif count > 1:
                self._seen_again[key] = _Seen(rowid, 1, count, row)
            elif old_digest != digest:
                updates.append((digest, rowid))
                self._emit(_UPDATE, key, row, 1)
                self.stats.updates += 1
        self._write(inserts, updates, hashed, key_hashes is not None)
        self.stats.rows += len(rows)
        self.stats.diffed += len(rows)

    def _write(
        self,
        inserts: list[tuple[bytes, bytes, int, int | None, int | None]],
        updates: list[tuple[bytes, int]],
        hashed: list[tuple[int | None, int | None, int]],
        bucket_read: bool,
    ) -> None:
        conn = self.index.conn
        idx = self._idx
        if bucket_read:
            conn.executemany(
                f"INSERT INTO {idx} (key, hash, n, key_hash, src_hash) VALUES (?, ?, ?, ?, ?)",
                inserts,
            )
            conn.executemany(f"UPDATE {idx} SET key_hash = ?, src_hash = ? WHERE rowid = ?", hashed)
        else:
            conn.executemany(
                f"INSERT INTO {idx} (key, hash, n) VALUES (?, ?, ?)", [i[:3] for i in inserts]
            )
        # A source hash kept for a row this read changed would no longer be the row's.
        forget = ", src_hash = NULL" if self.source_hashes and not bucket_read else ""
        conn.executemany(f"UPDATE {idx} SET hash = ?{forget} WHERE rowid = ?", updates)

    def add_bucket_chunk(self, rows: Sequence[Row]) -> None:
        """Compare one chunk of a bucket read: rows of its key hash, its source row hash, then
        its values."""
        key_hashes = [row[0] for row in rows]
        # Kept salted with the sums' signature: a source row hash is the same row's only under
        # the columns, types and hash format it was made with.
        salt = self.source_salt
        hashes = [(row[1] + salt + _HALF) % _SPAN - _HALF for row in rows]
        if self.key is not None and self.source_hashes:
            rest = self._not_seen_before(key_hashes, hashes)
            if len(rest) < len(rows):
                rows = [rows[i] for i in rest]
                key_hashes = [key_hashes[i] for i in rest]
                hashes = [hashes[i] for i in rest]
        self.add_chunk([row[2:] for row in rows], key_hashes, hashes)

    def _not_seen_before(self, key_hashes: list[int], hashes: list[int]) -> list[int]:
        # A row whose key hash and source row hash are those the index keeps for one of its
        # rows is that row, unchanged (the argument of buckets.py, row by row): it is only
        # marked as seen, without being encoded. The others, by position, go through the
        # full diff.
        known = self._known_source_hashes(set(key_hashes))
        rest: list[int] = []
        for i, pair in enumerate(zip(key_hashes, hashes, strict=True)):
            rowid = known.get(pair)
            if rowid is None or rowid > self._old_max or self._bit(rowid):
                rest.append(i)
            else:
                self._set_bit(rowid)
        self.stats.rows += len(key_hashes) - len(rest)
        return rest

    def _known_source_hashes(self, key_hashes: set[int]) -> dict[tuple[int, int], int]:
        known: dict[tuple[int, int], int] = {}
        conn = self.index.conn
        wanted = list(key_hashes)
        for start in range(0, len(wanted), _LOOKUP_KEYS):
            part = wanted[start : start + _LOOKUP_KEYS]
            sql = (
                f"SELECT key_hash, src_hash, rowid FROM {self._idx} "
                f"WHERE key_hash IN ({','.join('?' * len(part))}) AND src_hash IS NOT NULL"
            )
            for key_hash, source_hash, rowid in conn.execute(sql, part):
                known[(key_hash, source_hash)] = rowid
        return known

    @property
    def _idx(self) -> str:
        assert self._state is not None, "start() opens the run before chunks are added"
        return self._state.idx_table

    @property
    def idx_table(self) -> str:
        return self._idx

    @property
    def slot(self) -> int:
        assert self._state is not None, "start() opens the run"
        return self._state.slot

    @property
    def columns_json(self) -> list[dict[str, str]]:
        return self._columns_json

    def _encode(
        self,
        rows: Sequence[Row],
        key_hashes: Sequence[int] | None,
        source_hashes: Sequence[int] | None,
    ) -> dict[bytes, tuple[bytes, bytes, int, int | None, int | None]]:
        # Key bytes → (row bytes, row hash, how often the key occurs in this chunk, key hash,
        # source row hash).
        entries: dict[bytes, tuple[bytes, bytes, int, int | None, int | None]] = {}
        key_pos = self._key_pos
        # The loop runs once per row of the table: its functions are looked up once.
        encode_row, dumps, row_hash, key_bytes = (
            codec.encode_row, codec.dumps, codec.row_hash, codec.key_bytes
        )
        none = [None] * len(rows)
        hashes = zip(key_hashes or none, source_hashes or none, strict=True)
        for source_row, (key_hash, source_hash) in zip(rows, hashes, strict=True):
            wire = encode_row(source_row)
            row = dumps(wire)
            digest = row_hash(row, wire)
            if key_pos is None:
                wire_key: Any = digest.hex()
            else:
                wire_key = [wire[p] for p in key_pos]
            key = key_bytes(wire_key)
            previous = entries.get(key)
            count = 1 if previous is None else previous[2] + 1
            entries[key] = (row, digest, count, key_hash, source_hash)
        return entries

    def _lookup(self, keys: list[bytes]) -> dict[bytes, tuple[int, bytes, int]]:
        found: dict[bytes, tuple[int, bytes, int]] = {}
        conn = self.index.conn
        for start in range(0, len(keys), _LOOKUP_KEYS):
            part = keys[start : start + _LOOKUP_KEYS]
            marks = ",".join("?" * len(part))
            sql = f"SELECT key, rowid, hash, n FROM {self._idx} WHERE key IN ({marks})"
            for key, rowid, digest, n in conn.execute(sql, part):
                found[key] = (rowid, digest, n)
        return found

    def _again(self, key: bytes, rowid: int, stored_n: int, count: int, row: bytes) -> None:
        # A key seen in an earlier chunk of this run: a duplicate for a keyed table, one more
        # copy of the row for a keyless one.
        seen = self._seen_again.get(key)
        if seen is not None:
            seen.count += count
        elif rowid > self._old_max:
            self._seen_again[key] = _Seen(rowid, stored_n, stored_n + count, row)
        else:
            self._seen_again[key] = _Seen(rowid, 1, 1 + count, row)

    def _bit(self, rowid: int) -> bool:
        return bool(self._bitmap[rowid >> 3] & (1 << (rowid & 7)))

    def _set_bit(self, rowid: int) -> None:
        self._bitmap[rowid >> 3] |= 1 << (rowid & 7)
        self._matched += 1

    # Finishing

    def _fail_on_duplicates(self) -> None:
        if self.key is None:
            return
        duplicates = [(key, seen) for key, seen in self._seen_again.items() if seen.count > 1]
        if not duplicates:
            return
        key, first = duplicates[0]
        shown = key.decode()
        more = f" ({len(duplicates) - 1} more keys are duplicated)" if len(duplicates) > 1 else ""
        raise TableError(
            self.table,
            f"key {', '.join(self.key)} = {shown} occurs {first.count} times in the result"
            f"{more}; nothing was sent. Make the key unique (a JOIN that fans out, NULL keys) "
            "or leave 'key' out to treat the rows as a multiset",
        )

    def _finish_seen_again(self) -> None:
        # Keyless rows whose number of copies is only known now that the read is complete.
        conn = self.index.conn
        for key, seen in self._seen_again.items():
            if seen.count == seen.stored_n:
                continue
            conn.execute(f"UPDATE {self._idx} SET n = ? WHERE rowid = ?", (seen.count, seen.rowid))
            self._emit(_UPDATE, key, seen.row, seen.count)
            self.stats.updates += 1

    def _stage_deletes(self) -> None:
        # A read of every row tells by count how many it deleted, and a mass delete is refused
        # before the index is searched; a bucket read's deletes are counted as they are found.
        if self.scope is None:
            if self._matched == self._old_rows:
                return
            self._check_delete_share(self._old_rows - self._matched)
        gone = [(rowid,) for rowid in self._delete_candidates() if not self._bit(rowid)]
        if not gone:
            return
        if self.scope is not None:
            self._check_delete_share(len(gone))
        conn = self.index.conn
        builder = _BatchBuilder(_PHASE_DELETE)
        for start in range(0, len(gone), _LOOKUP_KEYS):
            part = [rowid for (rowid,) in gone[start : start + _LOOKUP_KEYS]]
            sql = f"SELECT key FROM {self._idx} WHERE rowid IN ({','.join('?' * len(part))})"
            for (key,) in conn.execute(sql, part):
                self._add(builder, _DELETE + key + b"]")
        self.stats.deletes += len(gone)
        conn.executemany(f"DELETE FROM {self._idx} WHERE rowid = ?", gone)
        self._flush(builder)

    def _delete_candidates(self) -> Iterator[int]:
        # The row ids the read could have returned: all, or those of the buckets it read,
        # which the key hash index gives without reading the rows.
        conn = self.index.conn
        if self.scope is None:
            sql = f"SELECT rowid FROM {self._idx} WHERE rowid <= ?"
            yield from (rowid for (rowid,) in conn.execute(sql, (self._old_max,)))
            return
        sql = f"SELECT rowid FROM {self._idx} WHERE key_hash BETWEEN ? AND ? AND rowid <= ?"
        for low, high in self.scope:
            yield from (rowid for (rowid,) in conn.execute(sql, (low, high, self._old_max)))

    def _check_delete_share(self, deletes: int) -> None:
        # A source that suddenly returns few rows (a wrong view, a table being reloaded) would
        # empty the store's copy: such a run waits for a confirmation.
        share = self.max_delete_share
        rows = self._old_rows
        if share is None or rows < MASS_DELETE_MIN_ROWS or deletes <= share * rows:
            return
        raise TableError(
            self.table,
            f"this run would delete {deletes} of its {rows} rows ({deletes / rows:.0%}), more "
            f"than max_delete_share = {share:g}; nothing was sent. If the rows are really "
            f"gone, run 'manta-async run --once --allow-mass-delete --table {self.table}' "
            f"or raise max_delete_share under [tables.{self.table}]",
        )

    def _number_batches(self) -> None:
        assert self._state is not None
        conn = self.index.conn
        if self.snapshot is not None and self.stats.batches == 0:
            # An empty table still replaces the store's copy: send one empty part.
            self._flush(_BatchBuilder(_PHASE_UPSERT, [], 0), allow_empty=True)
        staged = conn.execute(
            "SELECT id FROM outbox WHERE tbl = ? AND seq IS NULL ORDER BY phase, id",
            (self.table,),
        ).fetchall()
        seq = self._state.next_seq
        for part, (outbox_id,) in enumerate(staged, start=1):
            if self.snapshot is None:
                conn.execute("UPDATE outbox SET seq = ? WHERE id = ?", (seq, outbox_id))
            else:
                conn.execute(
                    "UPDATE outbox SET seq = ?, part = ?, last = ? WHERE id = ?",
                    (seq, part, part == len(staged), outbox_id),
                )
            seq += 1
        self._next_seq = seq

    def _record_table(self) -> None:
        columns = orjson.dumps([{"name": c.name, "type": c.type} for c in self.columns])
        rows = self._old_rows + self.stats.inserts - self.stats.deletes
        key = None if self.key is None else orjson.dumps(self.key)
        self.index.conn.execute(
            "UPDATE tables SET next_seq = ?, columns = ?, key = ?, rows = ?, synced_at = ?, "
            "resync = 0 WHERE name = ?",
            (self._next_seq, columns, key, rows, time.time(), self.table),
        )

    # Batches

    def _emit(self, op: bytes, key: bytes, row: bytes, count: int) -> None:
        if self.key is None:
            change = op + key + b"," + row + b"," + str(count).encode() + b"]"
        else:
            change = op + key + b"," + row + b"]"
        self._add(self._upserts, change)

    def _add(self, builder: _BatchBuilder, change: bytes) -> None:
        if builder.changes and (
            len(builder.changes) >= self.batch_rows
            or builder.size + len(change) > self.batch_bytes
        ):
            self._flush(builder)
        builder.changes.append(change)
        builder.size += len(change) + 1

    def _flush(self, builder: _BatchBuilder, allow_empty: bool = False) -> None:
        if not builder.changes and not allow_empty:
            return
        changes = b"[" + b",".join(builder.changes) + b"]"
        self.index.conn.execute(
            "INSERT INTO outbox (tbl, batch_id, phase, header, changes, rows) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                self.table,
                uuid.uuid4().hex,
                builder.phase,
                self._header,
                changes,
                len(builder.changes),
            ),
        )
        self.stats.batches += 1
        builder.changes = []
        builder.size = 0
