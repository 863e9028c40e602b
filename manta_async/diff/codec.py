"""The canonical encoding of rows: one value, one byte string, on every run and platform.

A row travels and is hashed as a JSON array of *wire values*. Values JSON carries exactly
(NULL, booleans, text, 64-bit integers, finite floats) are themselves; every other value is a
one-key object whose key names its kind and whose value is text:

    Decimal('1.10')        {"$dec": "1.10"}        digits and scale kept, never a float
    float('nan')           {"$float": "NaN"}       also "Infinity" and "-Infinity"
    2**70                  {"$int": "1180591620717411303424"}
    b'\\xde\\xad'            {"$bytes": "3q0="}      standard base64
    datetime (naive)       {"$ts": "2024-05-01T10:00:00.000000"}
    datetime (aware)       {"$tstz": "2024-05-01T10:00:00.000000+00:00"}
    date                   {"$date": "2024-05-01"}
    time / time with zone  {"$time": "10:00:00.000000"} / {"$timetz": "10:00:00.000000+02:00"}
    timedelta              {"$interval": "-23:59:59.999999"}   hours, minutes, seconds
    IntervalText           {"$interval": "1 mon 2 days 03:00:00"}  PostgreSQL's text
    Special("$date", "infinity")  {"$date": "infinity"}  a value no Python value stands for
    UUID                   {"$uuid": "0b5c...-..."}
    IP address / interface {"$inet": "10.0.0.1"} / {"$inet": "10.0.0.1/8"}   (inet)
    IP network             {"$cidr": "10.0.0.0/8"}   (cidr)
    JsonText (json, jsonb) {"$json": "{\\"b\\": 2, \\"a\\": 1}"}  the database's text
    dict (parsed JSON)     {"$json": "{\\"a\\":1}"}  keys sorted
    list / tuple           [ ...wire values... ]     (PostgreSQL arrays)

The row hash is BLAKE2b-128 of the orjson encoding of the wire row's *identity form*; a key is
the orjson encoding of the identity form of its columns' wire values, so 1 and '1' are
different keys. The identity form is the wire form with each decimal's text normalized
(1.10 and 1.1000 are one value) and each JSON document's text reduced to its content (keys
sorted): the wire keeps the source's text, identity follows the value.
See docs/encoding.md for the whole contract.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import math
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from hashlib import blake2b
from typing import Any, NamedTuple

import orjson

from manta_async.errors import EncodeError

HASH_BYTES = 16
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1

Wire = Any
"""A JSON-compatible value as defined in the module docstring."""


class IntervalText(str):
    """A PostgreSQL interval as the server's text in IntervalStyle postgres ("1 mon 2 days
    03:00:00"): months, days and time stay apart, as PostgreSQL keeps them."""


class Interval(NamedTuple):
    """An interval with months or days, as `decode_value` returns it: a month is not 30 days
    and a day is not always 24 hours, so the three parts cannot become one timedelta."""

    months: int
    days: int
    microseconds: int


@dataclass(frozen=True, slots=True)
class Special:
    """A value the database holds that no Python value stands for: PostgreSQL's infinity dates,
    24:00:00 and years past 9999 or before 1, MySQL's zero dates. It travels as its text under
    the tag of its kind ({"$date": "0000-00-00"}), and decodes to that text."""

    tag: str
    text: str


class JsonText(str):
    """A JSON document as the database's text: it travels as that text, tagged "$json", and
    its identity is its content (see `identity_form`)."""


def _int(value: int) -> Wire:
    if _INT_MIN <= value <= _INT_MAX:
        return value
    return {"$int": str(value)}


def _float(value: float) -> Wire:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return {"$float": "NaN"}
    return {"$float": "Infinity" if value > 0 else "-Infinity"}


def _decimal(value: Decimal) -> Wire:
    # Every digit and the scale (1.10 stays 1.10), never an exponent: str writes that for most
    # values, 'f' for all, at three times the cost.
    text = str(value)
    if "E" in text or "e" in text:
        text = format(value, "f")
    return {"$dec": text}


def _bytes(value: bytes | bytearray | memoryview) -> Wire:
    return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}


def _datetime(value: dt.datetime) -> Wire:
    # Positional arguments: with keywords, isoformat takes a quarter longer.
    text = value.isoformat("T", "microseconds")
    return {"$tstz": text} if value.utcoffset() is not None else {"$ts": text}


def _date(value: dt.date) -> Wire:
    return {"$date": value.isoformat()}


def _time(value: dt.time) -> Wire:
    text = value.isoformat(timespec="microseconds")
    return {"$timetz": text} if value.utcoffset() is not None else {"$time": text}


def _interval(value: dt.timedelta) -> Wire:
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return {"$interval": _clock(micros)}


def _clock(micros: int) -> str:
    # PostgreSQL's spelling of a time-only interval, so that equal values have one text
    # whichever database they come from: -838:59:59.5 (MySQL TIME's range fits in it).
    sign = "-" if micros < 0 else ""
    seconds, fraction = divmod(abs(micros), 1_000_000)
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    text = f"{sign}{hours:02d}:{minute:02d}:{second:02d}"
    return f"{text}.{fraction:06d}".rstrip("0") if fraction else text


def _interval_text(value: IntervalText) -> Wire:
    return {"$interval": str(value)}


def _uuid(value: uuid.UUID) -> Wire:
    return {"$uuid": str(value)}


def _inet(value: Any) -> Wire:
    return {"$inet": str(value)}


def _cidr(value: Any) -> Wire:
    return {"$cidr": str(value)}


def _json(value: dict[str, Any]) -> Wire:
    return {"$json": orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()}


def _json_text(value: JsonText) -> Wire:
    return {"$json": str(value)}


def _special(value: Special) -> Wire:
    return {value.tag: value.text}


def _array(value: Sequence[Any]) -> Wire:
    return [encode_value(item) for item in value]


class _EncoderTable(dict[type, Callable[[Any], Wire]]):
    """The encoder of each type of value. Drivers return subclasses (asyncpg's UUID, pymysql's
    bytes-like): one is matched by its MRO the first time it is seen, and remembered."""

    def __missing__(self, kind: type) -> Callable[[Any], Wire]:
        for base in kind.__mro__[1:]:
            encoder = self.get(base)
            if encoder is not None:
                self[kind] = encoder
                return encoder
        raise EncodeError(
            f"values of type {kind.__module__}.{kind.__qualname__} cannot be encoded exactly; "
            "cast the column to text or a plain type in the table's SELECT"
        )


_ENCODERS = _EncoderTable(
    {
        int: _int,
        float: _float,
        Decimal: _decimal,
        bytes: _bytes,
        bytearray: _bytes,
        memoryview: _bytes,
        dt.datetime: _datetime,
        dt.date: _date,
        dt.time: _time,
        dt.timedelta: _interval,
        IntervalText: _interval_text,
        uuid.UUID: _uuid,
        ipaddress.IPv4Address: _inet,
        ipaddress.IPv6Address: _inet,
        ipaddress.IPv4Network: _cidr,
        ipaddress.IPv6Network: _cidr,
        ipaddress.IPv4Interface: _inet,
        ipaddress.IPv6Interface: _inet,
        dict: _json,
        JsonText: _json_text,
        Special: _special,
        list: _array,
        tuple: _array,
    }
)


_AS_IS = frozenset({str, bool, type(None)})
"""The types whose values are their own wire form; not their subclasses, which may differ."""


def encode_value(value: Any) -> Wire:
    """Return the wire form of one value a driver returned."""
    if type(value) in _AS_IS:
        return value
    return _ENCODERS[type(value)](value)


def encode_row(row: Sequence[Any]) -> list[Wire]:
    """Return the wire form of a row."""
    # encode_value written out: this runs once per value of the table.
    as_is, encoders = _AS_IS, _ENCODERS
    return [value if type(value) in as_is else encoders[type(value)](value) for value in row]


def dumps(wire: Wire) -> bytes:
    """Return the canonical bytes of a wire value or row."""
    return orjson.dumps(wire)


def _plain_decimal(text: str) -> str:
    # One text per value: no zeros after the last digit of the fraction, no negative zero.
    if "." in text:
        text = text.rstrip("0").removesuffix(".")
    return "0" if text == "-0" else text


def _json_number(text: str) -> orjson.Fragment:
    # Digits and exponent with the trailing zeros dropped: 1.50, 1.5 and 15e-1 are one text,
    # and 1e999999 is not written out in full.
    sign, digits, exponent = Decimal(text).as_tuple()
    assert isinstance(exponent, int), "JSON has no NaN or Infinity"
    while len(digits) > 1 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    if digits == (0,):
        return orjson.Fragment("0")
    body = "-" * sign + "".join(map(str, digits))
    return orjson.Fragment(f"{body}e{exponent}" if exponent else body)


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def _json_content(text: str) -> str:
    # Keys sorted, no spaces, every number by its value (parsed from its text, so no
    # float rounds two documents into one). Text that is not JSON is its own form.
    try:
        document = json.loads(
            text, parse_float=_json_number, parse_int=_json_number, parse_constant=_no_constant
        )
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode()
    except (ValueError, TypeError, RecursionError):
        return text


# Wire values whose text may change while their value does not: a decimal column widened from
# numeric(10,2) to numeric(12,4) turns 1.10 into 1.1000, and a JSON document may be written
# with its keys in another order or converted from json to jsonb. The row hash and the key
# bytes compare them in a normal form; the wire keeps the source's text.
_NORMAL_FORMS: dict[str, Callable[[str], str]] = {"$dec": _plain_decimal, "$json": _json_content}


def identity_form(wire: Wire) -> Wire:
    """Return `wire` with each value in the normal form its identity is compared in."""
    if isinstance(wire, list):
        return [identity_form(item) for item in wire]
    if isinstance(wire, dict) and len(wire) == 1:
        ((tag, text),) = wire.items()
        normal = _NORMAL_FORMS.get(tag)
        if normal is not None and isinstance(text, str):
            return {tag: normal(text)}
    return wire


_DECIMAL_VALUE = re.compile(rb'\{"\$dec":("(?:[^"\\]|\\.)*")\}')


def _plain_decimal_value(match: re.Match[bytes]) -> bytes:
    quoted = match.group(1)
    if b"\\" in quoted:
        return orjson.dumps({"$dec": _plain_decimal(orjson.loads(quoted))})
    # Without an escape, the JSON string is its text.
    return b'{"$dec":"' + _plain_decimal(quoted[1:-1].decode()).encode() + b'"}'


def _identity_bytes(encoded: bytes, wire: Wire | None) -> bytes:
    # A JSON string escapes its quotes, so a mark found in the bytes is a tag, never text;
    # most rows carry none and are hashed as they are. Most keys carry no tag at all, which
    # one search tells.
    if b'{"$' not in encoded:
        return encoded
    if b'{"$json":' in encoded:
        if wire is None:
            wire = orjson.loads(encoded)
        return orjson.dumps(identity_form(wire))
    # Only decimals, and only a text ending in a zero or a point has another normal form
    # (1.10, 1., -0): each such one is rewritten where it stands, the same bytes as dumping
    # the identity form of the whole row, without walking it in Python.
    if b'{"$dec":' in encoded and (b'0"}' in encoded or b'."}' in encoded):
        return _DECIMAL_VALUE.sub(_plain_decimal_value, encoded)
    return encoded


def row_hash(encoded_row: bytes, wire_row: Wire | None = None) -> bytes:
    """Return the row hash of a row given as its canonical bytes.

    The hash is taken over the row's identity form (see `identity_form`), so it compares values,
    not their spelling. The agent and the store both hash rows here: for a keyless table the row
    hash is the row's identity. Pass the row's wire form too, when at hand, to save parsing it.
    """
    return blake2b(_identity_bytes(encoded_row, wire_row), digest_size=HASH_BYTES).digest()


def key_bytes(wire_key: Wire) -> bytes:
    """Return the canonical bytes that identify a key (a wire list, or a keyless row's hash).

    Like the row hash, they are the bytes of the key's identity form.
    """
    return _identity_bytes(orjson.dumps(wire_key), wire_key)


_INTERVAL = re.compile(
    r"(?:(?P<years>[+-]?\d+) years? ?)?(?:(?P<months>[+-]?\d+) mons? ?)?"
    r"(?:(?P<days>[+-]?\d+) days? ?)?"
    r"(?:(?P<sign>[+-]?)(?P<hours>\d+):(?P<minutes>\d\d):(?P<seconds>\d\d(?:\.\d{1,6})?))?"
)


def _parse_interval(text: str) -> dt.timedelta | Interval:
    """Return a timedelta for a time-only interval, else an Interval of its three parts."""
    match = _INTERVAL.fullmatch(text)
    if match is None or not text:
        raise ValueError(f"{text!r} is not an interval in IntervalStyle postgres")
    parts = match.groupdict()
    micros = 0
    if parts["hours"] is not None:
        minutes = int(parts["minutes"]) + 60 * int(parts["hours"])
        seconds = Decimal(parts["seconds"]) + 60 * minutes
        micros = int(seconds * 1_000_000) * (-1 if parts["sign"] == "-" else 1)
    if parts["years"] is None and parts["months"] is None and parts["days"] is None:
        return dt.timedelta(microseconds=micros)
    months = 12 * int(parts["years"] or 0) + int(parts["months"] or 0)
    return Interval(months, int(parts["days"] or 0), micros)


def _or_text(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Return `parse`, except that text it cannot read (a `Special` value) is its own value."""

    def parse_or_text(text: str) -> Any:
        try:
            return parse(text)
        except ValueError:
            return text

    return parse_or_text


_DECODERS: dict[str, Callable[[str], Any]] = {
    "$dec": Decimal,
    "$float": float,
    "$int": int,
    "$bytes": base64.b64decode,
    "$ts": _or_text(dt.datetime.fromisoformat),
    "$tstz": _or_text(dt.datetime.fromisoformat),
    "$date": _or_text(dt.date.fromisoformat),
    "$time": _or_text(dt.time.fromisoformat),
    "$timetz": _or_text(dt.time.fromisoformat),
    "$interval": _parse_interval,
    "$uuid": uuid.UUID,
    "$inet": lambda text: (
        ipaddress.ip_interface(text) if "/" in text else ipaddress.ip_address(text)
    ),
    "$cidr": ipaddress.ip_network,
    "$json": lambda text: json.loads(text, parse_float=Decimal),
}


def decode_value(wire: Wire) -> Any:
    """Return the Python value a wire value stands for (the inverse of `encode_value`)."""
    if isinstance(wire, dict):
        ((tag, text),) = wire.items()
        return _DECODERS[tag](text)
    if isinstance(wire, list):
        return [decode_value(item) for item in wire]
    return wire


def text_value(wire: Wire) -> str:
    """Return a value as plain text, for CSV: NULL is the empty string."""
    if wire is None:
        return ""
    if isinstance(wire, bool):
        return "true" if wire else "false"
    if isinstance(wire, dict):
        ((_tag, text),) = wire.items()
        return str(text)
    if isinstance(wire, list):
        return orjson.dumps(wire).decode()
    return str(wire)
