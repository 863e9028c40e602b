"""PostgreSQL hashes its own rows: the SQL behind `PostgresSource.read_buckets`.

A value is hashed by its type's own 64-bit hash function where equal values of that type are
always identical values (integers, booleans, text compared byte by byte, timestamps, UUIDs),
and as its text otherwise: `numeric` 1.1 and 1.10 are equal but are different values, so they
go through their text, whose form the session pins (DateStyle, IntervalStyle, float digits,
bytea output, TimeZone). Each column has its own seed and its own stand-in for NULL, and the
column hashes are mixed by one more hash, so moving a value or a NULL to another column, or
swapping values between two rows, changes the sums.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg

from manta_async.extract import Origin
from manta_async.extract.base import Buckets, BucketSum, Column, Row

SETTINGS = (
    "SET LOCAL DateStyle = 'ISO, YMD'",
    "SET LOCAL IntervalStyle = 'postgres'",
    "SET LOCAL extra_float_digits = 3",
    "SET LOCAL bytea_output = 'hex'",
    "SET LOCAL TimeZone = 'UTC'",
    "SET LOCAL lc_monetary = 'C'",
    # The aggregate is one pass over the rows; compiling it costs more than it saves.
    "SET LOCAL jit = off",
    "SET LOCAL work_mem = '64MB'",
)

# The planner expects as many buckets as rows, so it sorts the rows to group them; a hash
# table of a few thousand buckets in each parallel worker sums them twice as fast. Set for the
# sums only: the table's own SELECT keeps the plans it would have had.
_SUMS_PLAN = {"enable_sort": "off", "parallel_setup_cost": "0", "parallel_tuple_cost": "0"}
_U32 = 4294967295
_SUM_CHUNK = 20_000

# Types whose hash function is an identity test: equal values are the same value.
_BY_VALUE = {
    "int2": "hashint8extended({v}::int8, {seed})",
    "int4": "hashint8extended({v}::int8, {seed})",
    "int8": "hashint8extended({v}, {seed})",
    "bool": "hashint4extended({v}::int4, {seed})",
    "text": 'hashtextextended({v} COLLATE "C", {seed})',
    "varchar": 'hashtextextended({v}::text COLLATE "C", {seed})',
    "timestamp": "timestamp_hash_extended({v}, {seed})",
    "timestamptz": "timestamp_hash_extended({v}::timestamp, {seed})",
    "uuid": "uuid_hash_extended({v}, {seed})",
    # char(n) as the text the client gets: a cast to text would drop its padding.
    "bpchar": 'hashtextextended(textin(bpcharout({v})) COLLATE "C", {seed})',
}
_BY_TEXT = 'hashtextextended({v}::text COLLATE "C", {seed})'
# A key hash must be the same for two values the diff takes for one key. The diff compares
# decimals by value (1.1 and 1.10 are one key), so a key's decimal is hashed by its value; a
# value it compares by a normal form the server cannot compute (a JSON document, an array or
# a composite that may hold one) is left out of the key hash, which only puts more rows into
# the same bucket.
_KEY_BY_VALUE = {**_BY_VALUE, "numeric": "hash_numeric_extended({v}, {seed})"}
_KEY_LEFT_OUT = {"json", "jsonb"}


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _value_hash(attribute: Any, seed: int, by_value: dict[str, str] = _BY_VALUE) -> str:
    kind = attribute.type
    template = _BY_TEXT
    if kind.schema == "pg_catalog" and kind.kind == "scalar":
        template = by_value.get(kind.name, _BY_TEXT)
    value = f"t.{quote(attribute.name)}"
    # A NULL stands for a constant of its own, different in every column.
    return f"coalesce({template.format(v=value, seed=seed)}, {-seed})"


def _key_value_hash(attribute: Any, seed: int) -> str | None:
    kind = attribute.type
    if kind.kind != "scalar" or kind.name in _KEY_LEFT_OUT:
        return None
    return _value_hash(attribute, seed, _KEY_BY_VALUE)


def _mixed(attributes: Sequence[Any], first_seed: int, mix_seed: int) -> str:
    parts = [_value_hash(a, first_seed + i) for i, a in enumerate(attributes)]
    return f"hashint8extended({' # '.join(parts)}, {mix_seed})"


def _key_mixed(attributes: Sequence[Any]) -> str:
    hashed = [_key_value_hash(a, 1001 + i) for i, a in enumerate(attributes)]
    parts = [part for part in hashed if part is not None]
    return f"hashint8extended({' # '.join(parts)}, 1)" if parts else "0"


class HashSql:
    """The expressions and statements for one SELECT and key."""

    def __init__(self, sql: str, attributes: Sequence[Any], key: list[str] | None) -> None:
        self.source = f"({sql.strip().rstrip(';')}) t"
        self.row_hash = _mixed(attributes, 1, 0)
        by_name = {a.name: a for a in attributes}
        if key is None or not all(name in by_name for name in key):
            # Without a key the whole row is the identity; a missing key column is reported
            # by the diff before any of these statements runs.
            key_mix = _key_mixed(attributes)
        else:
            key_mix = _key_mixed([by_name[name] for name in key])
        self.key_hash = f"({key_mix} & {_U32})"

    def count(self) -> str:
        return f"SELECT count(*) FROM {self.source}"

    def sums(self, bits: int, within_bits: int | None) -> str:
        bucket = f"(kh >> {32 - bits})::int4"
        inner = f"SELECT {self.key_hash} AS kh, {self.row_hash} AS h FROM {self.source}"
        if within_bits is not None:
            inner += self._where(within_bits)
        return f"SELECT {bucket}, count(*), sum(h) FROM ({inner}) s GROUP BY 1"

    def rows(self, bits: int, only: bool) -> str:
        select = (
            f"SELECT {self.key_hash} AS _manta_key_hash, {self.row_hash} AS _manta_row_hash, "
            f"t.* FROM {self.source}"
        )
        return select + self._where(bits) if only else select

    def _where(self, bits: int) -> str:
        # The row hash is only computed for the rows this lets through.
        return f" WHERE ({self.key_hash} >> {32 - bits})::int4 = ANY($1::int4[])"


class PostgresBucketRead:
    """`BucketRead` on one open REPEATABLE READ transaction."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        hash_sql: HashSql,
        columns: list[Column],
        origin: Origin,
        lost: tuple[type[BaseException], ...],
        row_of: Callable[[asyncpg.Record], Row],
    ) -> None:
        self._conn = conn
        self._sql = hash_sql
        self._columns = columns
        self._origin = origin
        self._lost = lost
        self._row_of = row_of

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def count(self) -> int:
        try:
            return int(await self._conn.fetchval(self._sql.count()))
        except self._lost as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc

    async def sums(
        self, bits: int, within: Buckets | None = None
    ) -> AsyncIterator[list[BucketSum]]:
        sql = self._sql.sums(bits, None if within is None else within[0])
        args = () if within is None else (list(within[1]),)
        former = await self._plan_with(_SUMS_PLAN)
        async for records in self._cursor(sql, args, _SUM_CHUNK):
            yield [(b, n, int(total) & 0xFFFFFFFFFFFFFFFF) for b, n, total in records]
        await self._plan_with(former)

    async def rows(
        self, bits: int, only: Sequence[int] | None, chunk_rows: int
    ) -> AsyncIterator[list[Row]]:
        args = () if only is None else (list(only),)
        sql = self._sql.rows(bits, only is not None)
        row_of = self._row_of
        async for records in self._cursor(sql, args, chunk_rows):
            yield [row_of(record) for record in records]

    async def _plan_with(self, settings: dict[str, str]) -> dict[str, str]:
        """Set planner settings until the transaction ends; return their former values."""
        names, values = list(settings), list(settings.values())
        try:
            former = await self._conn.fetch(
                "SELECT name, current_setting(name), set_config(name, value, true) "
                "FROM unnest($1::text[], $2::text[]) AS s(name, value)",
                names,
                values,
            )
        except self._lost as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc
        return {name: value for name, value, _ in former}

    async def _cursor(
        self, sql: str, args: tuple[Any, ...], chunk_rows: int
    ) -> AsyncIterator[list[asyncpg.Record]]:
        # A short chunk means the portal is complete; a lost connection raises instead.
        try:
            cursor = await self._conn.cursor(sql, *args)
            while True:
                records = await cursor.fetch(chunk_rows)
                if records:
                    yield records
                if len(records) < chunk_rows:
                    return
        except self._lost as exc:
            raise self._origin.lost(str(exc)) from exc
        except asyncpg.PostgresError as exc:
            raise self._origin.query_failed(str(exc)) from exc
