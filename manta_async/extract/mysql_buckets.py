"""MariaDB hashes its own rows: the SQL behind `MysqlSource.read_buckets`.

A row is hashed as one string: each value as the text the server sends it in (time_zone and
character set are pinned for the session), text and binary values prefixed by their length so
no value can pass for a separator, and NULL as a letter no such text can be. CRC32 and CRC32C
of that string, each multiplied by an odd constant, make the 64-bit row hash: the products
keep the two checksums' linearity from cancelling out when values are swapped between two
rows of a bucket. The key hash is the CRC32 of the key's values written the same way.

Servers without CRC32C (MySQL, MariaDB before 10.8) hash the string with MD5 instead, which
is slower.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from manta_async.extract.base import Buckets, BucketSum, Column, Row

_SUM_CHUNK = 20_000
GROUP_BY_BYTES = 256 * 1024 * 1024
"""The session's in-memory temporary table limit while it sums a table by buckets."""
_U64 = 0xFFFFFFFFFFFFFFFF

# Types whose text never holds the separator, so they need no length in front.
_PLAIN = {
    "tinyint", "smallint", "mediumint", "int", "bigint", "decimal", "float", "double",
    "date", "time", "datetime", "timestamp", "year", "null",
}  # fmt: skip


def quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _part(column: Column) -> str:
    value = f"t.{quote(column.name)}"
    if column.type in _PLAIN:
        return f"IFNULL({value}, 'N')"
    return f"IFNULL(CONCAT(LENGTH({value}), ':', {value}), 'N')"


def _text(columns: Sequence[Column]) -> str:
    return f"CONCAT_WS(0x1f, {', '.join(_part(c) for c in columns)})"


def has_crc32c(server_version: str) -> bool:
    """True for MariaDB 10.8 and later, which have CRC32C."""
    # MariaDB announces itself as "5.5.5-10.11.19-MariaDB-..." to old clients.
    match = re.search(r"(\d+)\.(\d+)\.\d+-MariaDB", server_version)
    if match is None:
        return False
    return (int(match.group(1)), int(match.group(2))) >= (10, 8)


class HashSql:
    """The expressions and statements for one SELECT and key."""

    def __init__(
        self, sql: str, columns: Sequence[Column], key: list[str] | None, crc32c: bool
    ) -> None:
        self.source = f"({sql.strip().rstrip(';')}) t"
        text = _text(columns)
        if crc32c:
            self.row_hash = f"((CRC32({text}) * 1640531527) ^ (CRC32C({text}) * 2147483629))"
        else:
            self.row_hash = f"CAST(CONV(LEFT(MD5({text}), 16), 16, 10) AS UNSIGNED)"
        by_name = {c.name: c for c in columns}
        if key is None or not all(name in by_name for name in key):
            # A missing key column is reported by the diff before any statement runs.
            self.key_hash = f"CRC32(CONCAT({text}, 'k'))"
        else:
            self.key_hash = f"CRC32({_text([by_name[name] for name in key])})"

    def count(self) -> str:
        return f"SELECT COUNT(*) FROM {self.source}"

    def sums(self, bits: int, within: Buckets | None) -> str:
        bucket = f"{self.key_hash} >> {32 - bits}"
        inner = f"SELECT {bucket} AS b, {self.row_hash} AS h FROM {self.source}"
        if within is not None:
            inner += self._where(*within)
        # ORDER BY NULL: MariaDB would otherwise sort the groups it returns.
        return f"SELECT b, COUNT(*), SUM(h) FROM ({inner}) s GROUP BY b ORDER BY NULL"

    def rows(self, bits: int, only: Sequence[int] | None) -> str:
        # The row hash as a signed 64-bit integer, the form the index keeps.
        select = (
            f"SELECT {self.key_hash} AS _manta_key_hash, "
            f"CAST({self.row_hash} AS SIGNED) AS _manta_row_hash, t.* FROM {self.source}"
        )
        return select if only is None else select + self._where(bits, only)

    def _where(self, bits: int, only: Sequence[int]) -> str:
        buckets = ",".join(str(int(b)) for b in only) or "-1"
        return f" WHERE {self.key_hash} >> {32 - bits} IN ({buckets})"


class Rows(Protocol):
    """A statement's rows, read to their end by `chunks`."""

    finished: bool

    def chunks(self) -> AsyncIterator[list[Row]]: ...


class MysqlBucketRead:
    """`BucketRead` on one open consistent-snapshot transaction.

    `run(sql, chunk_rows)` executes one statement on the transaction's cursor.
    """

    def __init__(
        self,
        run: Callable[[str, int], Awaitable[Rows]],
        hash_sql: HashSql,
        columns: list[Column],
    ) -> None:
        self._run_sql = run
        self._sql = hash_sql
        self._columns = columns
        self.finished = True
        """False while a statement's rows are not read to their end."""

    @property
    def columns(self) -> list[Column]:
        return self._columns

    async def count(self) -> int:
        counted = [row async for rows in self._run(self._sql.count(), 2) for row in rows]
        return int(counted[0][0])

    async def sums(
        self, bits: int, within: Buckets | None = None
    ) -> AsyncIterator[list[BucketSum]]:
        async for rows in self._run(self._sql.sums(bits, within), _SUM_CHUNK):
            yield [(int(b), int(n), int(total) & _U64) for b, n, total in rows]

    async def rows(
        self, bits: int, only: Sequence[int] | None, chunk_rows: int
    ) -> AsyncIterator[list[Row]]:
        async for rows in self._run(self._sql.rows(bits, only), chunk_rows):
            yield rows

    async def _run(self, sql: str, chunk_rows: int) -> AsyncIterator[list[Row]]:
        # An unbuffered result must be read to its end before the next statement.
        self.finished = False
        result = await self._run_sql(sql, chunk_rows)
        async for rows in result.chunks():
            yield rows
        self.finished = result.finished
