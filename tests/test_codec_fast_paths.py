"""The row loop's shortcuts give exactly the bytes of the plain definitions they stand for."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

import orjson

from manta_async.diff import codec

TEXTS = ["1.10", "1.00", "-0.00", "100", "-0", "0.0", "NaN", "-1.2300", "0.000100", "1e5",
         'a"b', "x\\y", "", ".", "-.0", "10.", "é", '{"$dec":"1.10"}']  # fmt: skip


def wire_value(rng: random.Random, depth: int = 0) -> Any:
    draw = rng.random()
    if draw < 0.4:
        return {"$dec": rng.choice(TEXTS)}
    if draw < 0.5 and depth < 3:
        return [wire_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if draw < 0.6:
        return rng.choice(TEXTS)
    if draw < 0.7:
        return {"$ts": "2020-01-01T00:00:00.000000"}
    return rng.choice([1, None, True, "s", 1.5, -0.0, 2**63])


def test_decimals_rewritten_in_place_equal_the_dumped_identity_form() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        row = [wire_value(rng) for _ in range(rng.randint(1, 6))]
        encoded = orjson.dumps(row)
        assert codec.row_hash(encoded) == codec.row_hash(encoded, row)
        assert codec.row_hash(encoded) == codec.row_hash(orjson.dumps(codec.identity_form(row)))


def test_rows_encode_as_value_by_value() -> None:
    row = ("text", None, True, 7, 2**70, Decimal("1.10"), 1.5, float("nan"), b"\x00",
           dt.datetime(2024, 5, 1, 10, 0), ["a", None, False])  # fmt: skip
    assert codec.encode_row(row) == [codec.encode_value(value) for value in row]
