"""Reading only the buckets that changed, on real PostgreSQL and MariaDB servers and SQLite.

The source sums its row hashes per bucket of keys (a SQLite source has the agent hash its rows
as they are read); a run reads and diffs the rows of the buckets whose sums moved, finds
deletes only among them, and falls back to reading every row when most buckets moved. The
store's copy must stay equal to the source's throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from manta_async import agent
from manta_async.config import Config, SourceConfig, load_config
from manta_async.diff import buckets, codec
from manta_async.diff.buckets import MIN_BITS, BucketSums, choose_bits, key_hash_ranges
from manta_async.diff.differ import DiffStats
from manta_async.extract import connect
from manta_async.extract.base import BucketSource
from manta_async.store import StoreServer
from tests.conftest import MakeConfig, unique_name
from tests.dbs import MysqlDb, PostgresDb, SourceDb, SqliteDb
from tests.test_sync import stats_of, store_rows

ROWS = 2000
CREATE = {
    "postgres": "CREATE TABLE {t} (id integer PRIMARY KEY, a text, b text, price numeric(8,2))",
    "mariadb": "CREATE TABLE {t} (id INT PRIMARY KEY, a VARCHAR(50), b VARCHAR(50), "
    "price DECIMAL(8,2)) CHARACTER SET utf8mb4",
    "sqlite": "CREATE TABLE {t} (id INTEGER PRIMARY KEY, a TEXT, b TEXT, price DECIMAL(8,2))",
}


def source_db(kind: str, request: pytest.FixtureRequest) -> SourceDb:
    if kind == "postgres":
        return PostgresDb(request.getfixturevalue("pg_url"))
    if kind == "mariadb":
        return MysqlDb(request.getfixturevalue("mysql_url"))
    return SqliteDb(request.getfixturevalue("tmp_path") / "source.db")


@pytest.fixture(params=["postgres", "mariadb", "sqlite"])
def db(request: pytest.FixtureRequest) -> SourceDb:
    return source_db(request.param, request)


@pytest.fixture(params=["postgres", "mariadb"])
def server_db(request: pytest.FixtureRequest) -> SourceDb:
    """A database server, which renders the values it hashes as text of its own."""
    return source_db(request.param, request)


@pytest.fixture(autouse=True, params=["fine", "coarse first"])
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each case once summing the fine buckets at once, and once with a coarse pass first
    (which the test tables, with 256 buckets, are otherwise too small for)."""
    if request.param == "coarse first":
        monkeypatch.setattr(buckets, "COARSE_BITS", 4)


@pytest.fixture
def table(db: SourceDb) -> Iterator[str]:
    yield from table_of(db)


@pytest.fixture
def server_table(server_db: SourceDb) -> Iterator[str]:
    yield from table_of(server_db)


def table_of(db: SourceDb) -> Iterator[str]:
    name = unique_name("buckets")
    db.execute(CREATE[db.kind].format(t=name))
    marks = ", ".join([db.placeholder()] * 4) if db.kind != "postgres" else "$1, $2, $3, $4"
    # The sqlite3 module takes no Decimal: SQLite makes the number of the text.
    price = str if db.kind == "sqlite" else Decimal
    rows = [(i, f"a{i}", None if i % 7 == 0 else f"b{i}", price(f"{i}.50"))
            for i in range(1, ROWS + 1)]  # fmt: skip
    db.executemany(f"INSERT INTO {name} VALUES ({marks})", rows)
    yield name
    db.execute(f"DROP TABLE {name}")


async def first_run(config: Config, table: str) -> None:
    report = await agent.run_once(config, [table])
    assert report.exit_code == agent.EXIT_OK
    assert stats_of(report, table) == (ROWS, 0, 0)


async def run_stats(config: Config, table: str) -> DiffStats:
    report = await agent.run_once(config, [table])
    assert report.exit_code == agent.EXIT_OK
    assert report.sync is not None
    outcome = next(o for o in report.sync.tables if o.table == table)
    assert outcome.stats is not None, outcome.error
    return outcome.stats


async def rows_read(config: Config, table: str) -> tuple[int, tuple[int, int, int]]:
    stats = await run_stats(config, table)
    return stats.rows, (stats.inserts, stats.updates, stats.deletes)


async def test_unchanged_table_reads_no_row(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    assert await rows_read(config, table) == (0, (0, 0, 0))


async def test_changed_bucket_reads_only_that_bucket(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    db.execute(f"UPDATE {table} SET a = 'moved' WHERE id = 77")
    read, changes = await rows_read(config, table)

    # 2000 rows in 256 buckets: one bucket holds a handful of rows, never the table.
    assert changes == (0, 1, 0)
    assert 1 <= read <= 40
    assert await store_rows(store, table) == db.encoded_rows(sql)


async def test_unchanged_rows_of_a_changed_bucket_are_not_diffed(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    db.execute(f"UPDATE {table} SET b = 'moved' WHERE id IN (77, 1234)")
    stats = await run_stats(config, table)

    # The other rows of the two buckets come with the row hash the index kept for them.
    assert (stats.inserts, stats.updates, stats.deletes) == (0, 2, 0)
    assert stats.rows > 2
    assert stats.diffed == 2
    assert await store_rows(store, table) == db.encoded_rows(sql)


WIDEN = {
    "postgres": "ALTER TABLE {t} ALTER COLUMN price TYPE numeric(10,4)",
    "mariadb": "ALTER TABLE {t} MODIFY price DECIMAL(10,4)",
}


async def test_row_hashes_follow_a_new_text_of_the_same_values(
    server_db: SourceDb, server_table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    db, table = server_db, server_table
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    # A wider decimal: 77.50 now reads 77.5000, the same value in another text. Every row
    # hash moves, every row is diffed once and nothing is sent; the hashes kept are the new.
    db.execute(WIDEN[db.kind].format(t=table))
    widened = await run_stats(config, table)
    db.execute(f"UPDATE {table} SET a = 'moved' WHERE id = 77")
    after = await run_stats(config, table)

    assert (widened.inserts, widened.updates, widened.deletes) == (0, 0, 0)
    assert widened.diffed == ROWS
    assert (after.updates, after.diffed) == (1, 1)


async def test_change_read_without_buckets_is_not_undone_by_a_bucket_read(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    text = config.path.read_text()
    await first_run(config, table)

    # Changed while the table is read row by row, then changed back under the bucket route:
    # the sums and row hashes the index kept from before must not pass the row as unchanged.
    config.path.write_text(text + "hash_in_source = false\n")
    db.execute(f"UPDATE {table} SET a = 'second' WHERE id = 77")
    assert (await rows_read(load_config(config.path), table))[1] == (0, 1, 0)
    config.path.write_text(text)
    db.execute(f"UPDATE {table} SET a = 'a77' WHERE id = 77")
    _, changes = await rows_read(load_config(config.path), table)

    assert changes == (0, 1, 0)
    assert await store_rows(store, table) == db.encoded_rows(sql)


async def test_delete_is_found_inside_the_changed_bucket_only(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    db.execute(f"DELETE FROM {table} WHERE id IN (5, 1500)")
    db.execute(f"INSERT INTO {table} (id, a) VALUES (5000, 'new')")
    read, changes = await rows_read(config, table)

    assert changes == (1, 0, 2)
    assert read <= 80
    assert await store_rows(store, table) == db.encoded_rows(sql)
    assert await rows_read(config, table) == (0, (0, 0, 0))


async def test_null_moving_to_another_column_is_an_update(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT id, a, b FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    db.execute(f"UPDATE {table} SET a = NULL, b = 'x' WHERE id = 10")
    await first_run(config, table)

    db.execute(f"UPDATE {table} SET a = 'x', b = NULL WHERE id = 10")
    _, changes = await rows_read(config, table)

    assert changes == (0, 1, 0)
    assert await store_rows(store, table) == db.encoded_rows(sql)


async def test_keyless_duplicates_do_not_cancel_out(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT a, b FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql}})
    await first_run(config, table)

    # Two copies of one new row: a XOR of row hashes would not see them.
    db.execute(f"INSERT INTO {table} (id, a, b) VALUES (9001, 'twin', 'twin')")
    db.execute(f"INSERT INTO {table} (id, a, b) VALUES (9002, 'twin', 'twin')")
    read, changes = await rows_read(config, table)

    assert changes == (1, 0, 0)
    assert read <= 40
    assert await store_rows(store, table) == db.encoded_rows(sql)


async def test_many_changed_buckets_read_every_row(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)

    db.execute(f"UPDATE {table} SET b = 'all' WHERE id % 3 = 0")
    read, changes = await rows_read(config, table)

    assert read == ROWS
    assert changes == (0, ROWS // 3, 0)
    assert await store_rows(store, table) == db.encoded_rows(sql)


async def test_hash_in_source_false_reads_every_row(
    db: SourceDb, table: str, store: StoreServer, make_config: MakeConfig
) -> None:
    sql = f"SELECT * FROM {table}"
    config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
    await first_run(config, table)
    config.path.write_text(config.path.read_text() + "hash_in_source = false\n")

    assert await rows_read(load_config(config.path), table) == (ROWS, (0, 0, 0))


# The sums themselves, straight from each database


async def total(db: SourceDb, sql: str, key: list[str] | None) -> tuple[int, int]:
    async with await connect(SourceConfig(url=db.url), Path(".")) as source:
        assert isinstance(source, BucketSource)
        async with source.read_buckets(sql, key) as read:
            sums = BucketSums.empty(MIN_BITS)
            async for chunk in read.sums(MIN_BITS):
                sums.add(chunk)
    return sums.rows, sum(sums.sums) % 2**64


def literal_rows(db: SourceDb, rows: list[tuple[int, str | None, str | None]]) -> str:
    cast = "::text" if db.kind == "postgres" else ""
    parts = []
    for i, a, b in rows:
        values = [f"'{v}'{cast}" if v is not None else f"NULL{cast}" for v in (a, b)]
        parts.append(f"SELECT {i} AS id, {values[0]} AS a, {values[1]} AS b")
    return " UNION ALL ".join(parts)


@pytest.mark.parametrize("key", [["id"], None], ids=["keyed", "keyless"])
async def test_rows_differing_only_in_where_a_null_sits_differ(
    db: SourceDb, key: list[str] | None
) -> None:
    left = await total(db, literal_rows(db, [(1, None, "x"), (2, "", None)]), key)
    right = await total(db, literal_rows(db, [(1, "x", None), (2, None, "")]), key)
    assert left[0] == right[0] == 2
    assert left[1] != right[1]


async def test_values_swapped_between_rows_change_the_sum(db: SourceDb) -> None:
    left = await total(db, literal_rows(db, [(1, "x", "y"), (2, "y", "x")]), None)
    right = await total(db, literal_rows(db, [(1, "y", "x"), (2, "x", "y")]), None)
    assert left[1] != right[1]


async def test_two_copies_of_a_row_do_not_cancel(db: SourceDb) -> None:
    twins = await total(db, literal_rows(db, [(1, "a", None), (1, "a", None)]), None)
    other = await total(db, literal_rows(db, [(1, "b", None), (1, "b", None)]), None)
    assert twins[0] == other[0] == 2
    assert twins[1] != other[1] and twins[1] != 0


async def test_sums_leave_the_planner_settings_as_they_were(pg_url: str) -> None:
    async with await connect(SourceConfig(url=pg_url), Path(".")) as source:
        assert isinstance(source, BucketSource)
        async with source.read_buckets("SELECT 1 AS id", ["id"]) as read:
            conn = read._conn  # type: ignore[attr-defined]
            await conn.execute("SET LOCAL parallel_tuple_cost = 0.25")
            async for _ in read.sums(MIN_BITS):
                pass
            settings = await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY 1",
                ["enable_sort", "parallel_setup_cost", "parallel_tuple_cost"],
            )
    assert [tuple(s) for s in settings] == [
        ("enable_sort", "on"), ("parallel_setup_cost", "1000"), ("parallel_tuple_cost", "0.25")
    ]  # fmt: skip


# The arithmetic


def test_bucket_count_follows_the_table_size() -> None:
    assert choose_bits(0) == MIN_BITS
    assert choose_bits(1_000_000) == 18
    assert choose_bits(10**12) == 20


def test_neighbouring_buckets_merge_into_one_key_hash_range() -> None:
    assert key_hash_ranges([3, 1, 2, 7], 8) == [(1 << 24, (4 << 24) - 1), (7 << 24, (8 << 24) - 1)]


def test_folding_keeps_counts_and_sums() -> None:
    sums = BucketSums.empty(9)
    sums.add([(0, 1, 5), (1, 2, 2**64 - 1), (511, 3, 7)])
    folded = sums.folded(8)
    assert (folded.counts[0], folded.sums[0]) == (3, 4)
    assert (folded.counts[255], folded.sums[255]) == (3, 7)
    assert folded.differing(sums.folded(8)) == []


def test_replacing_under_coarse_buckets_keeps_the_others() -> None:
    old = BucketSums.empty(8)
    old.add([(0, 1, 1), (17, 1, 2), (255, 1, 3)])
    part = BucketSums.empty(8)
    part.add([(16, 2, 9)])
    new = old.replaced(part, 4, [1])
    assert [(b, new.counts[b], new.sums[b]) for b in range(256) if new.counts[b]] == [
        (0, 1, 1), (16, 2, 9), (255, 1, 3)
    ]  # fmt: skip
    assert old.counts[17] == 1


@pytest.mark.parametrize(
    "left, right",
    [(0.0, -0.0), ("a\x00b", "a\x00c"), (1, "1"), (1, 1.0), (b"1", "1"), (0.1 + 0.2, 0.3)],
    ids=["signed zero", "text past a NUL", "int or text", "int or real", "blob or text",
         "last digit"],
)  # fmt: skip
async def test_sqlite_row_hash_tells_apart_values_sqlite_keeps_apart(
    tmp_path: Path, left: object, right: object
) -> None:
    # SQLite's own quote() would render each of these pairs alike, or cut the text at the NUL.
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)")
    db.execute("INSERT INTO t VALUES (1, ?)", (left,))
    before = await total(db, "SELECT id, v FROM t", ["id"])
    db.execute("UPDATE t SET v = ? WHERE id = 1", (right,))
    after = await total(db, "SELECT id, v FROM t", ["id"])

    assert before[0] == after[0] == 1
    assert before[1] != after[1]


# Cases where the source's own text of a value and the diff's view of it part ways


@pytest.mark.parametrize(
    "before, after, value",
    [("varchar(8)", "char(8)", "'ab'"), ("char(8)", "char(10)", "'ab'"),
     ("inet", "cidr", "'10.0.0.0/8'")],
    ids=["varchar to char", "char widened", "inet to cidr"],
)  # fmt: skip
async def test_new_column_type_with_a_new_encoding_is_sent(
    pg_url: str, store: StoreServer, make_config: MakeConfig, before: str, after: str, value: str
) -> None:
    # The values stay equal in the database, but the client now gets another value (padded
    # text, a network): every row is sent again, none passes on the hash it had before.
    db, table = PostgresDb(pg_url), unique_name("retyped")
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, c {before})")
    try:
        db.execute(f"INSERT INTO {table} SELECT g, {value} FROM generate_series(1, 100) g")
        sql = f"SELECT id, c FROM {table}"
        config = make_config(store.url, db.url, {table: {"sql": sql, "key": ["id"]}})
        await run_stats(config, table)
        db.execute(f"ALTER TABLE {table} ALTER COLUMN c TYPE {after}")
        stats = await run_stats(config, table)

        assert stats.updates == 100
        assert await store_rows(store, table) == db.encoded_rows(sql)
    finally:
        db.execute(f"DROP TABLE {table}")


def by_value(rows: list[bytes]) -> list[bytes]:
    """Rows as the diff compares them: decimals by value."""
    return sorted(orjson.dumps(codec.identity_form(orjson.loads(row))) for row in rows)


async def test_keyless_copies_of_one_decimal_in_two_texts_stay_counted(
    pg_url: str, store: StoreServer, make_config: MakeConfig
) -> None:
    # 1.1 and 1.10 are one row to the diff (two copies of it, kept in one text) but two texts
    # to the server: both must fall into one bucket, or a bucket read would count only the
    # copies it holds.
    db, table = PostgresDb(pg_url), unique_name("copies")
    db.execute(f"CREATE TABLE {table} (v numeric)")
    try:
        db.execute(f"INSERT INTO {table} SELECT g FROM generate_series(1, 100) g")
        db.execute(f"INSERT INTO {table} VALUES (1.1), (1.10)")
        sql = f"SELECT v FROM {table}"
        config = make_config(store.url, db.url, {table: {"sql": sql}})
        await run_stats(config, table)

        db.execute(f"INSERT INTO {table} VALUES (1.1)")
        grown = await run_stats(config, table)
        assert by_value(await store_rows(store, table)) == by_value(db.encoded_rows(sql))
        db.execute(f"DELETE FROM {table} WHERE v::text = '1.10'")
        shrunk = await run_stats(config, table)
        assert by_value(await store_rows(store, table)) == by_value(db.encoded_rows(sql))

        assert grown.rows < 100 and shrunk.rows < 100
    finally:
        db.execute(f"DROP TABLE {table}")


async def test_failed_sums_leave_the_next_table_its_run(
    tmp_path: Path, store: StoreServer, make_config: MakeConfig
) -> None:
    db = SqliteDb(tmp_path / "source.db")
    db.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v INTEGER)")
    db.execute("CREATE TABLE b (id INTEGER PRIMARY KEY, v TEXT)")
    db.executemany("INSERT INTO a VALUES (?, ?)", [(i, i) for i in range(1, 50)])
    db.executemany("INSERT INTO b VALUES (?, ?)", [(i, f"v{i}") for i in range(1, 50)])
    tables = {"a": {"sql": "SELECT id, abs(v) AS x FROM a", "key": ["id"]},
              "b": {"sql": "SELECT * FROM b", "key": ["id"]}}  # fmt: skip
    config = make_config(store.url, db.url, tables)
    assert (await agent.run_once(config, ["a", "b"])).exit_code == agent.EXIT_OK

    # abs() of the smallest integer fails while the rows of a are summed.
    db.execute("INSERT INTO a VALUES (1000, -9223372036854775808)")
    db.execute("UPDATE b SET v = 'changed' WHERE id = 3")
    report = await agent.run_once(config, ["a", "b"])

    assert report.exit_code == agent.EXIT_TABLE_FAILED
    assert stats_of(report, "b") == (0, 1, 0)
    assert await store_rows(store, "b") == db.encoded_rows("SELECT * FROM b")
