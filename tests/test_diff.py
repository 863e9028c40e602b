"""The diff against the index: inserts, updates, deletes, duplicates, keyless multisets.

These drive `TableDiff` with Python rows, as an extractor hands them over, on a real index
file; the end-to-end tests against real databases are in test_sync.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from manta_async.diff.differ import DiffStats, TableDiff
from manta_async.diff.index import Index
from manta_async.errors import TableError
from manta_async.extract.base import Column

COLUMNS = [Column("id", "int"), Column("name", "text"), Column("price", "numeric")]


async def run_table(
    index: Index,
    rows: Sequence[tuple[Any, ...]],
    *,
    key: list[str] | None = ["id"],  # noqa: B006
    columns: list[Column] = COLUMNS,  # noqa: B006
    chunk: int = 3,
    batch_rows: int = 100,
) -> DiffStats:
    diff = TableDiff(index, "t", key, columns, batch_rows, 1 << 20)
    await index.call(diff.start)
    for start in range(0, len(rows), chunk):
        await index.call(diff.add_chunk, rows[start : start + chunk])
    return await index.call(diff.commit)


async def staged(index: Index) -> list[dict[str, Any]]:
    """The batches in the outbox, decoded, in the order the store must apply them."""
    batches = []
    for batch in await index.call(index.outbox):
        batches.append(orjson.loads(await index.call(index.outbox_payload, batch, "agent")))
        await index.call(index.outbox_done, batch)
    return batches


def changes(batches: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(c[0], c[1]) for b in batches for c in b["changes"]]


@pytest.fixture
async def index(tmp_path: Path) -> Any:
    async with Index(tmp_path / "index.db") as opened:
        yield opened


ROWS: list[tuple[int, str, Decimal | None]] = [
    (i, f"name {i}", Decimal(f"{i}.10")) for i in range(1, 11)
]


async def test_first_run_inserts_every_row(index: Index) -> None:
    stats = await run_table(index, ROWS)
    assert (stats.rows, stats.inserts, stats.updates, stats.deletes) == (10, 10, 0, 0)
    batches = await staged(index)
    assert [b["seq"] for b in batches] == [1]
    assert changes(batches) == [("insert", [i]) for i in range(1, 11)]
    assert batches[0]["changes"][0][2] == [1, "name 1", {"$dec": "1.10"}]


async def test_unchanged_rerun_stages_nothing(index: Index) -> None:
    await run_table(index, ROWS)
    await staged(index)
    stats = await run_table(index, list(reversed(ROWS)), chunk=4)
    assert stats.changes == 0 and stats.batches == 0
    assert await staged(index) == []


async def test_update_insert_delete_are_found_and_deletes_come_first(index: Index) -> None:
    await run_table(index, ROWS)
    await staged(index)
    rows = [r for r in ROWS if r[0] not in (2, 9)]
    rows[0] = (1, "renamed", Decimal("1.10"))
    rows.append((11, "new", None))
    stats = await run_table(index, rows, batch_rows=1)
    assert (stats.inserts, stats.updates, stats.deletes) == (1, 1, 2)
    batches = await staged(index)
    assert [b["seq"] for b in batches] == [2, 3, 4, 5]
    assert changes(batches) == [("delete", [2]), ("delete", [9]), ("update", [1]), ("insert", [11])]


async def test_typed_keys_differ(index: Index) -> None:
    rows = [("doc-7", "12"), ("doc-71", "2"), (1, 23), (12, 3), ("1", 23)]
    columns = [Column("a", "text"), Column("b", "text")]
    stats = await run_table(index, rows, key=["a", "b"], columns=columns)
    assert stats.inserts == 5
    await staged(index)

    stats = await run_table(index, rows[1:], key=["a", "b"], columns=columns)
    assert (stats.inserts, stats.updates, stats.deletes) == (0, 0, 1)
    assert changes(await staged(index)) == [("delete", ["doc-7", "12"])]


@pytest.mark.parametrize("chunk", [1, 10], ids=["across chunks", "in one chunk"])
async def test_duplicate_key_fails_the_table_and_keeps_the_index(index: Index, chunk: int) -> None:
    await run_table(index, ROWS)
    await staged(index)
    rows = ROWS + [(4, "again", None), (4, "and again", None), (None, "a", None), (None, "b", None)]
    rows[0] = (1, "changed", None)

    with pytest.raises(TableError) as failure:
        await run_table(index, rows, chunk=chunk)
    message = str(failure.value)
    assert "table 't'" in message and "occurs 3 times" in message and "[4]" in message
    assert "1 more keys are duplicated" in message
    assert await staged(index) == []
    stats = await run_table(index, ROWS)
    assert stats.changes == 0


async def test_keyless_table_counts_copies(index: Index) -> None:
    columns = [Column("tag", "text"), Column("product", "int")]
    rows = [("sale", 1), ("sale", 1), ("new", 2), (None, 3)]
    stats = await run_table(index, rows, key=None, columns=columns, chunk=1)
    assert stats.inserts == 3
    first = await staged(index)
    copies = {tuple(c[2]): c[3] for c in first[0]["changes"] if c[0] == "insert"}
    final = {tuple(c[2]): c[3] for b in first for c in b["changes"]}
    assert copies[("sale", 1)] == 1 and final[("sale", 1)] == 2

    stats = await run_table(index, [("sale", 1), ("new", 2), ("new", 2), (None, 3)], key=None,
                            columns=columns, chunk=2)  # fmt: skip
    assert (stats.inserts, stats.updates, stats.deletes) == (0, 2, 0)
    counts = {tuple(c[2]): c[3] for b in await staged(index) for c in b["changes"]}
    assert counts == {("sale", 1): 1, ("new", 2): 2}

    stats = await run_table(index, [("new", 2), ("new", 2)], key=None, columns=columns)
    assert (stats.inserts, stats.updates, stats.deletes) == (0, 0, 2)


async def test_aborted_run_leaves_index_and_outbox_as_they_were(index: Index) -> None:
    await run_table(index, ROWS)
    await staged(index)
    diff = TableDiff(index, "t", ["id"], COLUMNS, 100, 1 << 20)
    await index.call(diff.start)
    await index.call(diff.add_chunk, [(1, "changed", None), (50, "new", None)])
    await index.call(diff.abort)

    assert await staged(index) == []
    stats = await run_table(index, ROWS)
    assert stats.changes == 0


async def test_missing_key_column_is_named(index: Index) -> None:
    with pytest.raises(TableError, match="key column.s. sku are not in the SELECT"):
        TableDiff(index, "t", ["sku"], COLUMNS, 100, 1 << 20)


async def test_batches_split_by_rows_and_bytes(index: Index) -> None:
    rows = [(i, "x" * 1000, None) for i in range(20)]
    diff = TableDiff(index, "t", ["id"], COLUMNS, 8, 5000)
    await index.call(diff.start)
    await index.call(diff.add_chunk, rows)
    stats = await index.call(diff.commit)
    batches = await staged(index)
    assert stats.batches == len(batches) == 5
    assert all(len(b["changes"]) <= 4 for b in batches)
    assert sum(len(b["changes"]) for b in batches) == 20
