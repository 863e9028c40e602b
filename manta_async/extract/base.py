"""What every extractor offers: a source that streams one SELECT's rows in chunks.

    async with await connect(source_config) as source:
        async with source.read("SELECT ...", chunk_rows=5000) as result:
            result.columns                      # names and database types
            async for rows in result.chunks():  # lists of tuples, at most chunk_rows long
                ...

`chunks()` ends normally only when the database said the result is complete; a lost
connection, a timeout or a server error raises `SourceError` instead, so a partial read can
never be mistaken for a whole one. Each read runs in one read-only snapshot of the database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

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
