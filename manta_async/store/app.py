"""The store's HTTP side: the aiohttp application, batch checking, and the server's lifecycle.

    async with StoreServer(Path("store-data"), token="s3cret") as server:
        server.url          # "http://127.0.0.1:41234"

The protocol (endpoints, batch format, status codes) is described in docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import csv
import enum
import hmac
import io
import json
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import orjson
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from manta_async.diff import codec
from manta_async.errors import StoreError
from manta_async.store.db import (
    Batch,
    BatchIdReusedError,
    SequenceGapError,
    StoreDB,
    TableInfo,
)

logger = logging.getLogger(__name__)

BATCH_FORMAT = 1
MAX_BODY_BYTES = 64 * 1024 * 1024
SHUTDOWN_TIMEOUT_S = 10.0
HEALTH_PATH = "/v1/health"

_MAX_INT = 2**63 - 1
_HEX_HASH = re.compile(f"[0-9a-f]{{{codec.HASH_BYTES * 2}}}")
_FIELDS = ("format", "id", "agent", "table", "seq", "columns", "key", "changes")
_OPTIONAL_FIELDS = ("snapshot",)
_UPSERT_OPS = ("insert", "update")
_SHOW_CHARS = 200
_APART = orjson.Fragment(b"\n")
"""Set between values encoded together: canonical bytes never hold a raw newline."""


_Upsert = tuple[bytes, int, bytes]


class BatchFormatError(ValueError):
    """A batch body that does not follow the batch format; the message says where."""


# --- checking a batch ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """What every change of one batch must look like."""

    width: int
    key_index: list[int] | None
    """Positions of the key columns in a row; None for a keyless table."""


def parse_batch(body: bytes, path_agent: str) -> Batch:
    """Check a batch body against the batch format and return it ready to apply.

    Raises `BatchFormatError` naming the first problem found.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BatchFormatError(f"body is not valid JSON: {exc}") from exc

    if not isinstance(doc, dict):
        raise BatchFormatError(f"body must be a JSON object, got {type(doc).__name__}")
    _check_fields(doc)

    agent = _name(doc, "agent")
    if agent != path_agent:
        raise BatchFormatError(
            f"agent {_show(agent)} in the body differs from {_show(path_agent)} in the URL"
        )

    columns = _columns(doc["columns"])
    key = _key(doc["key"], columns)
    deletes, upserts = _changes(doc["changes"], _shape(columns, key))
    part, last = _snapshot(doc.get("snapshot"))
    if part is not None and deletes:
        raise BatchFormatError("a snapshot batch carries inserts only, never a delete")
    return Batch(
        id=_batch_id(doc["id"]),
        agent=agent,
        table=_name(doc, "table"),
        seq=_seq(doc["seq"]),
        columns=columns,
        key=key,
        deletes=deletes,
        upserts=upserts,
        snapshot_part=part,
        snapshot_last=last,
    )


def _snapshot(value: Any) -> tuple[int | None, bool]:
    if value is None:
        return None, False
    if (
        not isinstance(value, dict)
        or set(value) != {"part", "last"}
        or type(value["part"]) is not int
        or not 1 <= value["part"] <= _MAX_INT
        or not isinstance(value["last"], bool)
    ):
        raise BatchFormatError(
            f'snapshot must be {{"part": 1 or more, "last": true or false}} (got {_show(value)})'
        )
    return value["part"], value["last"]


def _check_fields(doc: dict[str, Any]) -> None:
    missing = [field for field in _FIELDS if field not in doc]
    if missing:
        raise BatchFormatError(f"missing field {_show(missing[0])}")

    unknown = sorted(set(doc) - set(_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise BatchFormatError(f"unknown field {_show(unknown[0])}")

    if type(doc["format"]) is not int or doc["format"] != BATCH_FORMAT:
        raise BatchFormatError(
            f"format must be {BATCH_FORMAT} (got {_show(doc['format'])}); "
            f"this store reads batch format {BATCH_FORMAT} only"
        )


def _show(value: Any) -> str:
    # Messages quote what was sent as JSON, but cut short: a 10 MB row would drown the line.
    text = orjson.dumps(value).decode()
    return text if len(text) <= _SHOW_CHARS else f"{text[:_SHOW_CHARS]}... ({len(text)} chars)"


def _batch_id(value: Any) -> str:
    if isinstance(value, str) and len(value) <= 45:
        try:
            return uuid.UUID(value).hex
        except ValueError:
            pass
    raise BatchFormatError(f"id must be a UUID as 32 hex digits (got {_show(value)})")


def _name(doc: dict[str, Any], field: str) -> str:
    value = doc[field]
    if not isinstance(value, str) or not value:
        raise BatchFormatError(f"{field} must be a non-empty string (got {_show(value)})")
    return value


def _seq(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= _MAX_INT:
        raise BatchFormatError(f"seq must be an integer from 1 to 2**63-1 (got {_show(value)})")
    return value


def _columns(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BatchFormatError("columns must be a non-empty list of {name, type} objects")

    columns = []
    for i, column in enumerate(value):
        if (
            not isinstance(column, dict)
            or set(column) != {"name", "type"}
            or not isinstance(column["name"], str)
            or not column["name"]
            or not isinstance(column["type"], str)
        ):
            raise BatchFormatError(
                f"columns[{i}] must be an object with a non-empty string 'name' and a string "
                f"'type' (got {_show(column)})"
            )
        columns.append({"name": column["name"], "type": column["type"]})

    seen: set[str] = set()
    for column in columns:
        if column["name"] in seen:
            raise BatchFormatError(f"columns: name {_show(column['name'])} appears more than once")
        seen.add(column["name"])
    return columns


def _key(value: Any, columns: list[dict[str, str]]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise BatchFormatError(f"key must be a list of column names (got {_show(value)})")

    names = [column["name"] for column in columns]
    for name in value:
        if name not in names:
            raise BatchFormatError(
                f"key column {_show(name)} is not one of the columns {_show(names)}"
            )
        if value.count(name) > 1:
            raise BatchFormatError(f"key column {_show(name)} appears more than once")
    return value


def _shape(columns: list[dict[str, str]], key: list[str]) -> _Shape:
    names = [column["name"] for column in columns]
    key_index = [names.index(name) for name in key] if key else None
    return _Shape(width=len(columns), key_index=key_index)


@dataclass
class _Checked:
    """The changes of a batch once checked, as wire values: `encoded` encodes them together."""

    delete_keys: list[Any] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    rows: list[Any] = field(default_factory=list)

    def add_upsert(self, key: Any, n: int, row: list[Any]) -> None:
        self.keys.append(key)
        self.counts.append(n)
        self.rows.append(row)

    def encoded(self) -> tuple[list[bytes], list[_Upsert]]:
        """Return the key bytes of the deletes, and each upsert's (key bytes, n, row bytes)."""
        deletes = _encode_each(codec.key_bytes, self.delete_keys)
        keys = _encode_each(codec.key_bytes, self.keys)
        rows = _encode_each(codec.dumps, self.rows)
        return deletes, list(zip(keys, self.counts, rows, strict=True))


def _encode_each(encode: Callable[[Any], bytes], values: list[Any]) -> list[bytes]:
    """Return `encode(value)` for each of `values`, from one call of `encode` on all of them.

    A call per value costs far more than its encoding: the allocator takes about a page fault
    for each separate result of orjson (measured), while pieces cut from one result are small.
    """
    if not values:
        return []
    parts = [_APART] * (2 * len(values) - 1)
    parts[::2] = values
    try:
        pieces = encode(parts)[1:-1].split(b",\n,")
    except orjson.JSONEncodeError:
        # The whole is one level deeper than its values: one at orjson's limit goes alone.
        return [encode(value) for value in values]
    if len(pieces) != len(values):
        # Only a codec that wrote raw newlines would get here.
        return [encode(value) for value in values]
    return pieces


def _changes(value: Any, shape: _Shape) -> tuple[list[bytes], list[_Upsert]]:
    if not isinstance(value, list):
        raise BatchFormatError(f"changes must be a list (got {type(value).__name__})")

    # Upserts keep their order: a keyless row inserted early in a run and updated with its
    # final count later may appear twice in one batch, and the later change must win.
    checked = _Checked()
    if shape.key_index is None:
        _check_keyless_changes(value, shape, checked)
    else:
        _check_keyed_changes(value, shape, shape.key_index, checked)
    return checked.encoded()


def _check_keyed_changes(
    changes: list[Any], shape: _Shape, key_index: list[int], checked: _Checked
) -> None:
    # Nearly every change of a first sync is an upsert of a well-formed row with its key
    # columns as its key, spelled alike: such a change is taken here, in one pass. Any other
    # goes through `_add_change`, which takes it or names its first problem.
    add_key, add_count, add_row = checked.keys.append, checked.counts.append, checked.rows.append
    width, upsert_ops = shape.width, _UPSERT_OPS
    for i, change in enumerate(changes):
        if type(change) is list and len(change) == 3 and change[0] in upsert_ops:
            key, row = change[1], change[2]
            if (
                type(row) is list
                and len(row) == width
                and _non_wire(row) is None
                and _same(key, [row[k] for k in key_index])
            ):
                # The key is wire values of the row: checking the row checked it too.
                add_key(key)
                add_count(1)
                add_row(row)
                continue
        _add_change(i, change, shape, checked)


def _check_keyless_changes(changes: list[Any], shape: _Shape, checked: _Checked) -> None:
    # As for a table with a key. A row hash equal to the row's own is 32 lowercase hex
    # digits, so it needs no check of its own.
    add_key, add_count, add_row = checked.keys.append, checked.counts.append, checked.rows.append
    width, upsert_ops = shape.width, _UPSERT_OPS
    dumps, row_hash = codec.dumps, codec.row_hash
    for i, change in enumerate(changes):
        if type(change) is list and len(change) == 4 and change[0] in upsert_ops:
            key, row, n = change[1], change[2], change[3]
            if (
                type(row) is list
                and len(row) == width
                and type(n) is int
                and 1 <= n <= _MAX_INT
                and _non_wire(row) is None
                and row_hash(dumps(row), row).hex() == key
            ):
                add_key(key)
                add_count(n)
                add_row(row)
                continue
        _add_change(i, change, shape, checked)


def _add_change(i: int, change: Any, shape: _Shape, checked: _Checked) -> None:
    try:
        _check_change(change, shape, checked)
    except BatchFormatError as exc:
        raise BatchFormatError(f"changes[{i}]: {exc}") from None


def _check_change(change: Any, shape: _Shape, checked: _Checked) -> None:
    """Check a change in full and add it to `checked`; raise naming its first problem."""
    if not isinstance(change, list) or not change or not isinstance(change[0], str):
        raise BatchFormatError(
            f"a change must be a list starting with its op (got {_show(change)})"
        )

    op = change[0]
    if op == "delete":
        _expect_length(change, 2, '["delete", key]')
        _check_key(change[1], shape)
        checked.delete_keys.append(change[1])
    elif op in _UPSERT_OPS and shape.key_index is not None:
        _expect_length(change, 3, f'["{op}", key, row]')
        _check_keyed_upsert(change[1], change[2], shape, shape.key_index)
        checked.add_upsert(change[1], 1, change[2])
    elif op in _UPSERT_OPS:
        _expect_length(change, 4, f'["{op}", row hash, row, n] for a keyless table')
        _check_keyless_upsert(change[1], change[2], change[3], shape)
        checked.add_upsert(change[1], change[3], change[2])
    else:
        raise BatchFormatError(f"unknown op {_show(op)}; expected insert, update or delete")


def _expect_length(change: list[Any], length: int, form: str) -> None:
    if len(change) != length:
        raise BatchFormatError(f"{change[0]} must have the form {form} (got {len(change)} items)")


def _check_key(key: Any, shape: _Shape) -> None:
    if shape.key_index is None:
        if not isinstance(key, str) or not _HEX_HASH.fullmatch(key):
            raise BatchFormatError(
                f"a keyless table's key must be a row hash of {codec.HASH_BYTES * 2} lowercase "
                f"hex digits (got {_show(key)})"
            )
        return

    if not isinstance(key, list) or len(key) != len(shape.key_index):
        raise BatchFormatError(
            f"key must be a list of {len(shape.key_index)} wire values (got {_show(key)})"
        )
    _check_wire(key)


def _check_row(row: Any, shape: _Shape) -> None:
    if not isinstance(row, list) or len(row) != shape.width:
        raise BatchFormatError(
            f"row must be a list of {shape.width} wire values (got {_show(row)})"
        )
    _check_wire(row)


def _check_keyed_upsert(key: Any, row: Any, shape: _Shape, key_index: list[int]) -> None:
    _check_key(key, shape)
    _check_row(row, shape)

    # Compared as bytes: 1, 1.0 and true are equal in Python but different keys on the wire.
    if codec.key_bytes([row[i] for i in key_index]) != codec.key_bytes(key):
        raise BatchFormatError(f"key {_show(key)} differs from the row's key columns")


def _check_keyless_upsert(key: Any, row: Any, n: Any, shape: _Shape) -> None:
    _check_key(key, shape)
    _check_row(row, shape)

    if type(n) is not int or not 1 <= n <= _MAX_INT:
        raise BatchFormatError(f"n must be an integer from 1 to 2**63-1 (got {_show(n)})")
    if codec.row_hash(codec.dumps(row), row).hex() != key:
        raise BatchFormatError(f"row hash {key} is not the hash of the row")


def _check_wire(values: list[Any]) -> None:
    value = _non_wire(values)
    if value is not None:
        raise BatchFormatError(
            f"{_show(value)} is not a wire value; objects must have one "
            'key naming the kind and a text value, like {"$dec": "1.10"}'
        )


def _non_wire(values: list[Any]) -> dict[str, Any] | None:
    """Return the first object in `values`, nested lists included, that is not a wire value."""
    # orjson only makes JSON types, so only objects need a look: each must be {"$kind": text}.
    for value in values:
        kind = type(value)
        if kind is dict and not _is_tagged(value):
            return cast("dict[str, Any]", value)
        if kind is list:
            found = _non_wire(value)
            if found is not None:
                return found
    return None


def _is_tagged(value: dict[str, Any]) -> bool:
    if len(value) != 1:
        return False
    ((tag, text),) = value.items()
    return tag.startswith("$") and isinstance(text, str)


def _same(given: Any, wire: Any) -> bool:
    """Whether `given` is `wire` in value and in type throughout, so both have the same bytes.

    Python's == is not enough: it holds between 1, 1.0 and true, and between 0.0 and -0.0.
    """
    kind = type(given)
    if kind is not type(wire):
        return False
    if kind is list:
        if len(given) != len(wire):
            return False
        for given_item, wire_item in zip(given, wire, strict=True):
            if not _same(given_item, wire_item):
                return False
        return True
    if kind is dict:
        return list(given) == list(wire) and _same(list(given.values()), list(wire.values()))
    if kind is float:
        given, wire = given.hex(), wire.hex()
    return bool(given == wire)


# --- answering requests -------------------------------------------------------------------


class _StreamAbortedError(Exception):
    """A download failed after its first bytes; the connection must be cut, not answered."""


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status=status)


def _http_error_message(exc: web.HTTPException, request: web.Request) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}; see docs/protocol.md"
    if exc.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    if exc.status == 413:
        return f"request body too large ({exc.text}); send smaller batches"
    return exc.reason


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, _http_error_message(exc, request))
        if hdrs.ALLOW in exc.headers:
            response.headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
        return response
    except _StreamAbortedError:
        raise
    except StoreError as exc:
        logger.error("%s %s failed: %s", request.method, request.path, exc)
        return _error(503, f"{exc}; retry later")
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return _error(500, "the store failed to handle the request; see the store's log")


def _auth_middleware(token: str) -> Middleware:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == HEALTH_PATH:
            return await handler(request)

        given = request.headers.get(hdrs.AUTHORIZATION)
        if given is None:
            return _unauthorized("missing header 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            return _unauthorized("wrong bearer token; use the token the store was started with")
        return await handler(request)

    return check_token


def _unauthorized(message: str) -> web.Response:
    response = _error(401, message)
    response.headers[hdrs.WWW_AUTHENTICATE] = 'Bearer realm="manta-async store"'
    return response


class _CsvRow:
    """Turns one stored row into one CSV line; each download has its own."""

    def __init__(self) -> None:
        self._buffer = io.StringIO()
        self._writer = csv.writer(self._buffer, lineterminator="\r\n")

    def __call__(self, row: bytes) -> bytes:
        return self.line([codec.text_value(value) for value in orjson.loads(row)])

    def line(self, cells: list[str]) -> bytes:
        self._buffer.seek(0)
        self._buffer.truncate()
        self._writer.writerow(cells)
        return self._buffer.getvalue().encode()


def _ndjson_row(row: bytes) -> bytes:
    return row + b"\n"


def _table_json(info: TableInfo) -> dict[str, Any]:
    return {
        "table": info.table,
        "rows": info.rows,
        "last_seq": info.last_seq,
        "columns": info.columns,
        "key": info.key,
        "updated_at": info.updated_at,
    }


def _rows_headers(info: TableInfo, content_type: str) -> dict[str, str]:
    # json.dumps escapes non-ASCII names, which HTTP header values cannot carry as they are.
    return {
        hdrs.CONTENT_TYPE: content_type,
        "X-Manta-Columns": json.dumps(
            [column["name"] for column in info.columns], separators=(",", ":")
        ),
        "X-Manta-Key": json.dumps(info.key, separators=(",", ":")),
        "X-Manta-Seq": str(info.last_seq),
    }


class _Handlers:
    def __init__(self, db: StoreDB) -> None:
        self._db = db

    async def health(self, _request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def post_batch(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _error(415, f"Content-Type must be application/json, not {request.content_type}")

        body = await request.read()
        try:
            batch = await asyncio.to_thread(parse_batch, body, request.match_info["agent"])
        except BatchFormatError as exc:
            logger.warning("refused a batch from agent %s: %s", request.match_info["agent"], exc)
            return _error(400, str(exc))

        return await self._apply(batch)

    async def _apply(self, batch: Batch) -> web.Response:
        where = f"agent={batch.agent} table={batch.table} seq={batch.seq} batch={batch.id}"
        try:
            applied = await self._db.apply(batch)
        except SequenceGapError as exc:
            logger.warning("refused batch %s: %s", where, exc)
            return _error(409, str(exc), expected_seq=exc.expected_seq)
        except BatchIdReusedError as exc:
            logger.warning("refused batch %s: %s", where, exc)
            return _error(400, str(exc))

        if applied.duplicate:
            logger.info("batch already applied, answered duplicate: %s", where)
            return _json({"status": "duplicate", "seq": applied.seq})
        logger.info("applied batch %s changes=%d", where, batch.changes)
        return _json({"status": "applied", "seq": applied.seq})

    async def list_tables(self, request: web.Request) -> web.Response:
        agent = request.match_info["agent"]
        tables = await self._db.tables(agent)
        return _json({"tables": [_table_json(info) for info in tables]})

    async def get_batch(self, request: web.Request) -> web.Response:
        agent, given_id = request.match_info["agent"], request.match_info["id"]
        try:
            batch_id = uuid.UUID(given_id).hex
        except ValueError:
            return _error(404, f"no batch {_show(given_id)} was applied for agent {_show(agent)}")

        record = await self._db.batch(agent, batch_id)
        if record is None:
            return _error(404, f"no batch {_show(given_id)} was applied for agent {_show(agent)}")
        return _json(
            {
                "id": record.id,
                "agent": record.agent,
                "table": record.table,
                "seq": record.seq,
                "changes": record.changes,
                "applied_at": record.applied_at,
                "resent": record.resent,
            }
        )

    async def get_rows(self, request: web.Request) -> web.StreamResponse:
        agent, table = request.match_info["agent"], request.match_info["table"]
        row_format = request.query.get("format", "ndjson")
        if row_format not in ("ndjson", "csv"):
            return _error(400, f"format must be ndjson or csv (got {_show(row_format)})")

        async with self._db.rows(agent, table) as snapshot:
            if snapshot is None:
                return _error(
                    404, f"agent {_show(agent)} has no table {_show(table)} in this store"
                )

            encode_row: Callable[[bytes], bytes] = _ndjson_row
            header, content_type = b"", "application/x-ndjson"
            if row_format == "csv":
                encode_row = csv_row = _CsvRow()
                header = csv_row.line([column["name"] for column in snapshot.info.columns])
                content_type = "text/csv; charset=utf-8"

            response = web.StreamResponse(headers=_rows_headers(snapshot.info, content_type))
            await response.prepare(request)
            await _send_rows(request, response, header, snapshot.pieces(encode_row))
            logger.debug("served %d rows of %s/%s", snapshot.info.rows, agent, table)
            return response


async def _send_rows(
    request: web.Request, response: web.StreamResponse, header: bytes, pieces: AsyncIterator[bytes]
) -> None:
    try:
        if header:
            await response.write(header)
        async for piece in pieces:
            await response.write(piece)
    except ConnectionError:
        logger.debug("client left during the download of %s", request.path)
    except Exception as exc:
        # Headers are out: a complete-looking answer would hide the missing rows, so the
        # connection is cut instead, and the client sees a truncated body.
        logger.error("download of %s failed after it started: %s", request.path, exc)
        raise _StreamAbortedError(str(exc)) from exc


def create_app(db: StoreDB, token: str, max_body_bytes: int = MAX_BODY_BYTES) -> web.Application:
    """Return the store's aiohttp application, serving `db`; an empty token disables auth."""
    middlewares = [_json_errors] + ([_auth_middleware(token)] if token else [])
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)

    handlers = _Handlers(db)
    app.router.add_get(HEALTH_PATH, handlers.health)
    app.router.add_post("/v1/agents/{agent}/batches", handlers.post_batch)
    app.router.add_get("/v1/agents/{agent}/batches/{id}", handlers.get_batch)
    app.router.add_get("/v1/agents/{agent}/tables", handlers.list_tables)
    app.router.add_get("/v1/agents/{agent}/tables/{table}/rows", handlers.get_rows)
    return app


# --- the server ---------------------------------------------------------------------------


class ServerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class StoreServer:
    """The store, listening on `host`:`port` (0 picks a free port) with data in `data_dir`.

    Used once, as an async context manager; `url` is known inside the `async with` block.
    """

    def __init__(
        self,
        data_dir: Path,
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.state = ServerState.NEW
        self._token = token
        self._max_body_bytes = max_body_bytes
        self._db: StoreDB | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL the store answers on, like "http://127.0.0.1:41234"."""
        if self._url is None or self.state is not ServerState.RUNNING:
            raise StoreError(
                f"the store server is {self.state.value} and has no URL; read url inside "
                "'async with StoreServer(...)'"
            )
        return self._url

    async def __aenter__(self) -> StoreServer:
        if self.state is not ServerState.NEW:
            raise StoreError(
                f"this store server is already {self.state.value}; a StoreServer starts once, "
                "so create a new one"
            )

        db = StoreDB(self.data_dir)
        await db.open()
        try:
            self._runner, self._url = await self._listen(db)
        except BaseException:
            await db.close()
            raise
        self._db = db
        self.state = ServerState.RUNNING

        if not self._token:
            logger.warning(
                "the store accepts requests without a token; set one unless only "
                "trusted programs can reach %s",
                self._url,
            )
        logger.debug("store listening on %s with data in %s", self._url, self.data_dir)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.state = ServerState.CLOSED
        if self._runner is not None:
            await self._runner.cleanup()
        if self._db is not None:
            await self._db.close()
        logger.debug("store on %s stopped", self._url)

    async def _listen(self, db: StoreDB) -> tuple[web.AppRunner, str]:
        app = create_app(db, self._token, self._max_body_bytes)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise StoreError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; "
                "choose another host or port"
            ) from exc

        host, port = runner.addresses[0][:2]
        return runner, f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _on_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> list[signal.Signals]:
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, callback)
        except (NotImplementedError, RuntimeError, ValueError):
            # Windows loops, and loops outside the main thread, cannot take signal handlers;
            # there the caller stops the store by cancelling it.
            continue
        handled.append(sig)
    return handled


async def run_store(data_dir: Path, host: str, port: int, token: str) -> None:
    """Serve the store until cancelled or sent SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = _on_signals(loop, stop.set)

    try:
        async with StoreServer(data_dir, token, host, port) as server:
            logger.info("store serving %s with data in %s", server.url, data_dir)
            await stop.wait()
            logger.info("store stopping on signal")
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
