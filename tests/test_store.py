"""The receiving store, tested through a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from manta_async.diff import codec
from manta_async.errors import StoreError
from manta_async.store import StoreServer, run_store

TOKEN = "test-token"
AGENT = "shop-eu"
COLUMNS = [{"name": "id", "type": "int4"}, {"name": "total", "type": "numeric"}]


def make_batch(
    seq: int,
    changes: list[Any],
    table: str = "orders",
    key: list[str] | None = None,
    columns: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "format": 1,
        "id": uuid.uuid4().hex,
        "agent": AGENT,
        "table": table,
        "seq": seq,
        "columns": COLUMNS if columns is None else columns,
        "key": ["id"] if key is None else key,
        "changes": changes,
    }


def dec(text: str) -> dict[str, str]:
    return {"$dec": text}


def keyless_insert(row: list[Any], n: int) -> list[Any]:
    return ["insert", codec.row_hash(codec.dumps(row)).hex(), row, n]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreServer]:
    async with StoreServer(tmp_path / "store", TOKEN) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        yield session


async def post(
    client: aiohttp.ClientSession, store: StoreServer, batch: Any, agent: str = AGENT
) -> tuple[int, dict[str, Any]]:
    body = io.BytesIO(batch if isinstance(batch, bytes) else orjson.dumps(batch))
    async with client.post(
        f"{store.url}/v1/agents/{agent}/batches",
        data=body,
        headers={"Content-Type": "application/json"},
    ) as response:
        return response.status, orjson.loads(await response.read())


async def get_json(
    client: aiohttp.ClientSession, store: StoreServer, path: str
) -> tuple[int, dict[str, Any]]:
    async with client.get(f"{store.url}{path}") as response:
        return response.status, orjson.loads(await response.read())


async def get_rows(
    client: aiohttp.ClientSession, store: StoreServer, table: str = "orders", fmt: str = "ndjson"
) -> tuple[CIMultiDictProxy[str], bytes]:
    url = f"{store.url}/v1/agents/{AGENT}/tables/{table}/rows?format={fmt}"
    async with client.get(url) as response:
        assert response.status == 200, await response.text()
        return response.headers, await response.read()


async def ndjson_rows(
    client: aiohttp.ClientSession, store: StoreServer, table: str = "orders"
) -> list[Any]:
    _headers, body = await get_rows(client, store, table)
    return [orjson.loads(line) for line in body.splitlines()]


async def test_applies_insert_update_delete_and_serves_rows_as_ndjson(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    first = make_batch(1, [["insert", [id_], [id_, dec(f"{id_}.00")]] for id_ in (1, 2, 3)])
    second = make_batch(2, [["update", [2], [2, dec("20.50")]], ["delete", [3]], ["delete", [99]]])

    assert await post(client, store, first) == (200, {"status": "applied", "seq": 1})
    assert await post(client, store, second) == (200, {"status": "applied", "seq": 2})

    headers, body = await get_rows(client, store)
    assert body == b'[1,{"$dec":"1.00"}]\n[2,{"$dec":"20.50"}]\n'
    assert headers["Content-Type"] == "application/x-ndjson"
    assert orjson.loads(headers["X-Manta-Columns"]) == ["id", "total"]
    assert headers["X-Manta-Seq"] == "2"


async def test_serves_rows_as_csv_with_a_header_and_plain_text_cells(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    columns = [*COLUMNS, {"name": "note", "type": "text"}, {"name": "tags", "type": "_text"}]
    rows = [
        [1, dec("1.10"), 'says "hi", twice', ["a", "b"]],
        [2, {"$float": "NaN"}, None, []],
        [3, dec("0"), "line\nbreak", None],
    ]
    batch = make_batch(1, [["insert", [row[0]], row] for row in rows], columns=columns)
    assert (await post(client, store, batch))[0] == 200

    headers, body = await get_rows(client, store, fmt="csv")

    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert b"\r\n" in body
    assert list(csv.reader(io.StringIO(body.decode(), newline=""))) == [
        ["id", "total", "note", "tags"],
        ["1", "1.10", 'says "hi", twice', '["a","b"]'],
        ["2", "NaN", "", "[]"],
        ["3", "0", "line\nbreak", ""],
    ]


async def test_resent_batch_id_answers_duplicate_and_changes_nothing(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    batch = make_batch(1, [["insert", [1], [1, dec("1.00")]]])
    assert (await post(client, store, batch))[0] == 200
    later = make_batch(2, [["update", [1], [1, dec("2.00")]]])
    assert (await post(client, store, later))[0] == 200

    # Same id, even with different changes: the store answers from its record.
    batch["changes"] = [["insert", [1], [1, dec("666")]]]
    assert await post(client, store, batch) == (200, {"status": "duplicate", "seq": 1})

    assert await ndjson_rows(client, store) == [[1, dec("2.00")]]
    status, record = await get_json(client, store, f"/v1/agents/{AGENT}/batches/{batch['id']}")
    assert status == 200
    assert (record["seq"], record["resent"], record["changes"]) == (1, 1, 1)
    status, listing = await get_json(client, store, f"/v1/agents/{AGENT}/tables")
    assert listing["tables"][0]["last_seq"] == 2


async def test_concurrent_sends_of_one_batch_apply_it_once(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    batch = make_batch(1, [["insert", [1], [1, dec("1.00")]]])

    answers = await asyncio.gather(*(post(client, store, batch) for _ in range(8)))

    statuses = sorted(answer["status"] for _status, answer in answers)
    assert statuses == ["applied"] + ["duplicate"] * 7
    _status, record = await get_json(client, store, f"/v1/agents/{AGENT}/batches/{batch['id']}")
    assert record["resent"] == 7


@pytest.mark.parametrize("seq", [2, 5], ids=["first-batch-missing", "far-ahead"])
async def test_sequence_gap_answers_409_with_expected_seq_and_changes_nothing(
    store: StoreServer, client: aiohttp.ClientSession, seq: int
) -> None:
    gap = make_batch(seq, [["insert", [7], [7, dec("7.00")]]])

    assert await post(client, store, gap) == (
        409,
        {"error": f"sequence gap: expected seq 1, got {seq}", "expected_seq": 1},
    )

    status, _ = await get_json(client, store, f"/v1/agents/{AGENT}/tables/orders/rows")
    assert status == 404
    status, _ = await get_json(client, store, f"/v1/agents/{AGENT}/batches/{gap['id']}")
    assert status == 404
    # The refused id is not remembered: once the gap is filled, it applies.
    assert (await post(client, store, make_batch(1, [])))[0] == 200
    if seq == 2:
        assert await post(client, store, gap) == (200, {"status": "applied", "seq": 2})


async def test_old_seq_with_a_new_id_answers_409_and_changes_nothing(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    assert (await post(client, store, make_batch(1, [["insert", [1], [1, dec("1")]]])))[0] == 200

    replay = make_batch(1, [["delete", [1]]])

    status, answer = await post(client, store, replay)
    assert (status, answer["expected_seq"]) == (409, 2)
    assert await ndjson_rows(client, store) == [[1, dec("1")]]


async def test_deletes_apply_before_inserts_in_one_batch(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    first = make_batch(1, [["insert", [1], [1, dec("1.00")]], ["insert", [2], [2, dec("2.00")]]])
    assert (await post(client, store, first))[0] == 200

    # Listed upsert-first on purpose: applied in list order, key 1 would end up deleted.
    moved = make_batch(
        2,
        [
            ["insert", [1], [1, dec("1.50")]],
            ["insert", [3], [3, dec("2.00")]],
            ["delete", [1]],
            ["delete", [2]],
        ],
    )
    assert (await post(client, store, moved))[0] == 200

    assert await ndjson_rows(client, store) == [[1, dec("1.50")], [3, dec("2.00")]]


async def test_keyless_table_serves_each_row_n_times(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    columns = [{"name": "sku", "type": "text"}, {"name": "qty", "type": "int4"}]
    apple, pear, plum = ["apple", 1], ["pear", 2], ["plum", 3]
    first = make_batch(
        1,
        [keyless_insert(apple, 2), keyless_insert(pear, 1), keyless_insert(plum, 1)],
        table="basket",
        key=[],
        columns=columns,
    )
    assert (await post(client, store, first))[0] == 200

    pear_hash = codec.row_hash(codec.dumps(pear)).hex()
    plum_hash = codec.row_hash(codec.dumps(plum)).hex()
    second = make_batch(
        2,
        [["update", pear_hash, pear, 3], ["delete", plum_hash]],
        table="basket",
        key=[],
        columns=columns,
    )
    assert (await post(client, store, second))[0] == 200

    rows = await ndjson_rows(client, store, "basket")
    assert sorted(rows) == [apple, apple, pear, pear, pear]
    _status, listing = await get_json(client, store, f"/v1/agents/{AGENT}/tables")
    assert listing["tables"][0]["rows"] == 5
    assert listing["tables"][0]["key"] == []


async def test_later_upsert_of_a_key_in_one_batch_wins(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    columns = [{"name": "sku", "type": "text"}]
    batch = make_batch(
        1,
        [keyless_insert(["fig"], 1), ["update", *keyless_insert(["fig"], 4)[1:]]],
        table="basket",
        key=[],
        columns=columns,
    )

    assert (await post(client, store, batch))[0] == 200

    assert await ndjson_rows(client, store, "basket") == [["fig"]] * 4


async def test_tables_listing_reports_rows_seq_columns_and_key(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    rows = [["insert", [i], [i, dec("1")]] for i in range(5)]
    assert (await post(client, store, make_batch(1, rows)))[0] == 200
    assert (await post(client, store, make_batch(2, [["delete", [0]]])))[0] == 200
    assert (await post(client, store, make_batch(1, [], table="empty")))[0] == 200

    status, listing = await get_json(client, store, f"/v1/agents/{AGENT}/tables")

    assert status == 200
    empty, orders = listing["tables"]
    assert (orders["table"], orders["rows"], orders["last_seq"]) == ("orders", 4, 2)
    assert (orders["columns"], orders["key"]) == (COLUMNS, ["id"])
    assert orders["updated_at"].endswith("+00:00")
    assert (empty["table"], empty["rows"], empty["last_seq"]) == ("empty", 0, 1)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "],
    ids=["missing", "wrong", "not-bearer", "longer", "empty"],
)
async def test_missing_or_wrong_token_answers_401(
    store: StoreServer, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession(headers=headers) as session:
        for method, path in [
            ("POST", f"/v1/agents/{AGENT}/batches"),
            ("GET", f"/v1/agents/{AGENT}/tables"),
            ("GET", f"/v1/agents/{AGENT}/tables/orders/rows"),
            ("GET", f"/v1/agents/{AGENT}/batches/{uuid.uuid4().hex}"),
        ]:
            async with session.request(method, f"{store.url}{path}") as response:
                assert response.status == 401
                assert "token" in (await response.json())["error"]
                assert response.headers["WWW-Authenticate"].startswith("Bearer")

        async with session.get(f"{store.url}/v1/health") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok"})


async def test_empty_token_serves_without_auth_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="manta_async.store"):
        async with StoreServer(tmp_path, "") as store, aiohttp.ClientSession() as session:
            status, answer = await post(session, store, make_batch(1, []))

    assert (status, answer) == (200, {"status": "applied", "seq": 1})
    assert any("without a token" in record.message for record in caplog.records)


ROW_HASH = codec.row_hash(codec.dumps(["x"])).hex()
DROP = object()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"format": DROP}, 'missing field "format"'),
        ({"extra": 1}, 'unknown field "extra"'),
        ({"format": 2}, "format must be 1"),
        ({"id": "batch-1"}, "id must be a UUID"),
        ({"agent": "other"}, '"other" in the body differs from "shop-eu" in the URL'),
        ({"table": ""}, "table must be a non-empty string"),
        ({"seq": "3"}, "seq must be an integer"),
        ({"seq": 0}, "seq must be an integer"),
        ({"columns": [{"name": "id"}]}, "columns[0] must be an object"),
        ({"columns": [COLUMNS[0], COLUMNS[0]]}, 'name "id" appears more than once'),
        ({"key": ["nope"]}, 'key column "nope" is not one of the columns'),
        ({"changes": {}}, "changes must be a list"),
        ({"changes": [["upsert", [1], [1, 2]]]}, 'changes[0]: unknown op "upsert"'),
        ({"changes": [[]]}, "changes[0]: a change must be a list starting with its op"),
        ({"changes": [["insert", [1]]]}, 'changes[0]: insert must have the form ["insert"'),
        ({"changes": [["delete", 1]]}, "changes[0]: key must be a list of 1 wire values"),
        ({"changes": [["insert", [1], [1]]]}, "changes[0]: row must be a list of 2"),
        ({"changes": [["insert", [2], [1, 2]]]}, "changes[0]: key [2] differs from the row"),
        ({"changes": [["insert", [1.0], [1, 2]]]}, "key [1.0] differs from the row"),
        ({"changes": [["insert", [True], [1, 2]]]}, "key [true] differs from the row"),
        ({"changes": [["insert", [-0.0], [0.0, 2]]]}, "key [-0.0] differs from the row"),
        ({"changes": [["insert", [[1, True]], [[1, 1], 2]]]}, "key [[1,true]] differs"),
        ({"changes": [["insert", [{"$int": "1"}], [{"$dec": "1"}, 2]]]}, "differs from the row"),
        (
            {"changes": [["insert", [1], [1, 2]], ["update", [1.0], [1, 2]]]},
            "changes[1]: key [1.0] differs from the row",
        ),
        ({"changes": [["update", [1], [1, {"a": 1}]]]}, '{"a":1} is not a wire value'),
        ({"changes": [["update", [1], [1, {"$dec": 1}]]]}, "is not a wire value"),
        (
            {"key": [], "columns": [{"name": "s", "type": "text"}], "changes": [["delete", "xy"]]},
            "keyless table's key must be a row hash",
        ),
        (
            {"key": [], "columns": [{"name": "s", "type": "text"}],
             "changes": [["insert", ROW_HASH, ["y"], 1]]},
            f"row hash {ROW_HASH} is not the hash of the row",
        ),
        (
            {"key": [], "columns": [{"name": "s", "type": "text"}],
             "changes": [["insert", ROW_HASH, ["x"], 0]]},
            "n must be an integer from 1",
        ),
        (
            {"key": [], "columns": [{"name": "s", "type": "text"}],
             "changes": [["insert", ROW_HASH, ["x"], True]]},
            "n must be an integer from 1",
        ),
    ],
)  # fmt: skip
async def test_malformed_body_answers_400_naming_the_problem(
    store: StoreServer, client: aiohttp.ClientSession, body: Any, problem: str
) -> None:
    if isinstance(body, dict):
        merged = {**make_batch(1, [["insert", [1], [1, 2]]]), **body}
        body = orjson.dumps({field: value for field, value in merged.items() if value is not DROP})

    status, answer = await post(client, store, body)

    assert status == 400
    assert problem in answer["error"]
    assert await get_json(client, store, f"/v1/agents/{AGENT}/tables") == (200, {"tables": []})


async def test_key_matches_the_row_by_identity_not_by_spelling(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    changes = [
        ["insert", [dec("1.1")], [1, dec("1.10")]],
        ["update", [dec("1.100")], [2, dec("1.100")]],
    ]

    status, answer = await post(client, store, make_batch(1, changes, key=["total"]))

    assert status == 200, answer
    assert await ndjson_rows(client, store) == [[2, dec("1.100")]]


async def test_batch_id_reused_for_another_table_answers_400(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    batch = make_batch(1, [])
    assert (await post(client, store, batch))[0] == 200

    status, answer = await post(client, store, {**batch, "table": "other"})

    assert status == 400
    assert "already applied for agent 'shop-eu', table 'orders'" in answer["error"]


async def test_wrong_content_type_answers_415(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    async with client.post(
        f"{store.url}/v1/agents/{AGENT}/batches", data=b"{}", headers={"Content-Type": "text/plain"}
    ) as response:
        assert response.status == 415
        assert "application/json" in (await response.json())["error"]


async def test_body_over_the_limit_answers_413(tmp_path: Path) -> None:
    async with (
        StoreServer(tmp_path, TOKEN, max_body_bytes=1024) as store,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        batch = make_batch(1, [["insert", [i], [i, "x" * 50]] for i in range(50)])

        status, answer = await post(client, store, batch)

    assert status == 413
    assert "too large" in answer["error"]


async def test_body_larger_than_aiohttp_default_limit_is_accepted(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    columns = [{"name": "id", "type": "int4"}, {"name": "blob", "type": "text"}]
    batch = make_batch(1, [["insert", [i], [i, "x" * 1000]] for i in range(3000)], columns=columns)
    assert len(orjson.dumps(batch)) > 2 * 1024 * 1024

    assert await post(client, store, batch) == (200, {"status": "applied", "seq": 1})


async def test_gzip_encoded_body_is_applied(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    body = gzip.compress(orjson.dumps(make_batch(1, [["insert", [1], [1, dec("1")]]])))

    async with client.post(
        f"{store.url}/v1/agents/{AGENT}/batches",
        data=body,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ) as response:
        assert (response.status, await response.json()) == (200, {"status": "applied", "seq": 1})

    assert await ndjson_rows(client, store) == [[1, dec("1")]]


async def test_dashed_batch_id_is_recorded_as_32_hex_digits(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    batch_id = uuid.uuid4()
    batch = {**make_batch(1, []), "id": str(batch_id)}
    assert (await post(client, store, batch))[0] == 200

    status, record = await get_json(client, store, f"/v1/agents/{AGENT}/batches/{batch_id}")

    assert (status, record["id"]) == (200, batch_id.hex)
    assert await post(client, store, {**batch, "id": batch_id.hex}) == (
        200,
        {"status": "duplicate", "seq": 1},
    )


async def test_data_survives_a_server_restart(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    batch = make_batch(1, [["insert", [1], [1, dec("9.99")]]])
    async with StoreServer(tmp_path, TOKEN) as store, aiohttp.ClientSession(headers=headers) as c:
        assert (await post(c, store, batch))[0] == 200

    async with StoreServer(tmp_path, TOKEN) as store, aiohttp.ClientSession(headers=headers) as c:
        assert await ndjson_rows(c, store) == [[1, dec("9.99")]]
        assert await post(c, store, batch) == (200, {"status": "duplicate", "seq": 1})
        status, answer = await post(c, store, make_batch(3, []))
        assert (status, answer["expected_seq"]) == (409, 2)

    assert (tmp_path / "store.db").exists()


async def test_rows_endpoint_streams_20000_rows_in_key_byte_order(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    rows = [[i, dec(f"{i}.{i % 100:02d}")] for i in range(20_000)]
    for seq, start in enumerate(range(0, 20_000, 5000), start=1):
        changes = [["insert", [row[0]], row] for row in rows[start : start + 5000]]
        assert (await post(client, store, make_batch(seq, changes)))[0] == 200

    headers, body = await get_rows(client, store)

    assert headers["X-Manta-Seq"] == "4"
    expected = sorted(rows, key=lambda row: codec.key_bytes([row[0]]))
    assert body == b"".join(codec.dumps(row) + b"\n" for row in expected)
    _headers, csv_body = await get_rows(client, store, fmt="csv")
    assert csv_body.count(b"\r\n") == 20_001


async def test_keyless_row_with_many_copies_streams_them_all(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    columns = [{"name": "word", "type": "text"}]
    batch = make_batch(
        1, [keyless_insert(["echo"], 300_000)], table="words", key=[], columns=columns
    )
    assert (await post(client, store, batch))[0] == 200

    _headers, body = await get_rows(client, store, "words")

    assert body == b'["echo"]\n' * 300_000


async def test_exotic_values_round_trip_byte_for_byte_through_ndjson(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    row = [
        1,
        {"$dec": "0.100000000000000000000000000001"},
        {"$float": "NaN"},
        -0.0,
        {"$bytes": ""},
        None,
        "",
        2**64 - 1,
        -(2**63),
        5e-324,
        1.7976931348623157e308,
        0.1,
        "é \u2028 \x00 😀",
        [[1, None], {"$int": "1180591620717411303424"}],
        True,
        {"$json": '{"a":[1,2]}'},
    ]
    columns = [{"name": f"c{i}", "type": ""} for i in range(len(row))]
    batch = make_batch(1, [["insert", [1], row]], key=["c0"], columns=columns)

    assert (await post(client, store, batch))[0] == 200

    _headers, body = await get_rows(client, store)
    assert body == codec.dumps(row) + b"\n"


async def test_unknown_agent_or_table_answers_404_naming_them(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    assert (await post(client, store, make_batch(1, [])))[0] == 200

    status, answer = await get_json(client, store, f"/v1/agents/{AGENT}/tables/nope/rows")
    assert status == 404
    assert '"shop-eu"' in answer["error"] and '"nope"' in answer["error"]

    status, answer = await get_json(client, store, "/v1/agents/ghost/tables/orders/rows")
    assert status == 404
    assert '"ghost"' in answer["error"] and '"orders"' in answer["error"]

    # An agent that sent nothing yet simply has no tables.
    assert await get_json(client, store, "/v1/agents/ghost/tables") == (200, {"tables": []})

    status, answer = await get_json(client, store, f"/v1/agents/{AGENT}/batches/not-a-uuid")
    assert status == 404


async def test_unknown_rows_format_answers_400(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    assert (await post(client, store, make_batch(1, [])))[0] == 200

    status, answer = await get_json(
        client, store, f"/v1/agents/{AGENT}/tables/orders/rows?format=xml"
    )

    assert status == 400
    assert "ndjson or csv" in answer["error"]


async def test_rows_download_is_one_snapshot_while_batches_apply(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    rows = [["insert", [i], [i, dec("1")]] for i in range(20_000)]
    assert (await post(client, store, make_batch(1, rows)))[0] == 200

    url = f"{store.url}/v1/agents/{AGENT}/tables/orders/rows"
    async with client.get(url) as response:
        first_line = await response.content.readline()
        wipe = make_batch(2, [["delete", [i]] for i in range(20_000)])
        assert (await post(client, store, wipe))[0] == 200
        rest = await response.read()

    assert response.headers["X-Manta-Seq"] == "1"
    assert len((first_line + rest).splitlines()) == 20_000
    assert await ndjson_rows(client, store) == []


async def test_client_leaving_mid_download_leaves_the_store_serving(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    rows = [["insert", [i], [i, "x" * 200]] for i in range(20_000)]
    columns = [{"name": "id", "type": "int4"}, {"name": "pad", "type": "text"}]
    assert (await post(client, store, make_batch(1, rows, columns=columns)))[0] == 200

    for _ in range(3):
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as other:
            response = await other.get(f"{store.url}/v1/agents/{AGENT}/tables/orders/rows")
            await response.content.readline()
            response.close()

    assert len(await ndjson_rows(client, store)) == 20_000


async def test_server_lifecycle_misuse_raises_a_sentence(tmp_path: Path) -> None:
    server = StoreServer(tmp_path, TOKEN)
    with pytest.raises(StoreError, match="has no URL"):
        _ = server.url

    async with server:
        assert server.url.startswith("http://127.0.0.1:")
        with pytest.raises(StoreError, match="already running"):
            await server.__aenter__()

    with pytest.raises(StoreError, match="closed and has no URL"):
        _ = server.url
    with pytest.raises(StoreError, match="already closed; a StoreServer starts once"):
        await server.__aenter__()


async def test_port_in_use_raises_store_error_naming_it(tmp_path: Path) -> None:
    async with StoreServer(tmp_path / "a", TOKEN) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(StoreError, match=f"cannot listen on 127.0.0.1:{port}"):
            async with StoreServer(tmp_path / "b", TOKEN, port=port):
                pass


async def test_run_store_serves_until_cancelled_and_logs_its_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="manta_async.store")
    task = asyncio.create_task(run_store(tmp_path, "127.0.0.1", 0, TOKEN))
    for _ in range(200):
        serving = [r.message for r in caplog.records if r.message.startswith("store serving")]
        if serving or task.done():
            break
        await asyncio.sleep(0.01)

    url = serving[0].split()[2]
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/health") as response:
        assert response.status == 200

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert TOKEN not in caplog.text


async def test_snapshot_replaces_the_copy_only_at_its_last_part(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    old = make_batch(1, [["insert", [i], [i, dec("1.00")]] for i in (1, 2, 3)])
    assert (await post(client, store, old))[0] == 200

    # A snapshot restarts the sequence: its first part is taken whatever seq came before,
    # and until its last part, readers see the old copy and the old columns.
    wide = [*COLUMNS, {"name": "note", "type": "text"}]

    def part(seq: int, ids: list[int], last: bool) -> dict[str, Any]:
        batch = make_batch(seq, [["insert", [i], [i, dec(f"{i}.00"), "n"]] for i in ids],
                           columns=wide)  # fmt: skip
        batch["snapshot"] = {"part": seq, "last": last}
        return batch

    assert await post(client, store, part(1, [7, 8], False)) == (
        200, {"status": "applied", "seq": 1})  # fmt: skip
    assert [r[0] for r in await ndjson_rows(client, store)] == [1, 2, 3]
    _status, listing = await get_json(client, store, f"/v1/agents/{AGENT}/tables")
    assert len(listing["tables"][0]["columns"]) == 2

    assert await post(client, store, part(2, [9], True)) == (
        200, {"status": "applied", "seq": 2})  # fmt: skip
    assert [r[0] for r in await ndjson_rows(client, store)] == [7, 8, 9]
    _status, listing = await get_json(client, store, f"/v1/agents/{AGENT}/tables")
    (table,) = listing["tables"]
    assert (table["rows"], table["last_seq"], len(table["columns"])) == (3, 2, 3)


async def test_snapshot_batch_with_a_delete_answers_400(
    store: StoreServer, client: aiohttp.ClientSession
) -> None:
    batch = make_batch(1, [["insert", [1], [1, dec("1.00")]], ["delete", [2]]])
    batch["snapshot"] = {"part": 1, "last": True}
    status, body = await post(client, store, batch)
    assert status == 400 and "snapshot batch carries inserts only" in body["error"]
