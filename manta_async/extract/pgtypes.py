"""How the PostgreSQL extractor decodes the types whose asyncpg value loses what the server holds.

asyncpg's defaults are right for most types; for these they are not:

- json and jsonb arrive as plain strings, so a document rewritten with its keys in another
  order would look changed: they come back as `codec.JsonText`, compared by content.
- interval becomes a timedelta with a month folded into 30 days: it comes back as the
  server's text in IntervalStyle postgres ("1 mon"), as `codec.IntervalText`.
- bit and bit varying become asyncpg's BitString, which the codec cannot carry: they come
  back as the server's text of their bits ("1010"), a plain string.
- date, timestamp and timestamptz map infinity onto 9999-12-31 and 0001-01-01, and raise on a
  year past 9999 or before 1; time and timetz raise on 24:00:00. They are decoded here from
  the binary form: the values Python can hold as asyncpg would, the others as
  `codec.Special` text ("infinity", "+10000-01-01", "24:00:00.000000").

The decoders run in Python, but a value Python can hold takes one step: a timestamp is read as
fast as by asyncpg's own decoder, a date faster.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg

from manta_async.diff import codec

_Y2K = dt.date(2000, 1, 1)
"""PostgreSQL counts days and microseconds from 2000-01-01."""
_Y2K_ORDINAL = _Y2K.toordinal()
_Y2K_NAIVE = dt.datetime(2000, 1, 1)
_Y2K_UTC = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
_DAY_US = 86_400_000_000
_DATE_INFINITY = 2**31 - 1
_TS_INFINITY = 2**63 - 1
_GREGORIAN_CYCLE_DAYS = 146_097
"""Days in 400 Gregorian years, after which the calendar repeats itself."""


async def use_exact_codecs(conn: asyncpg.Connection) -> None:
    """Make `conn` decode the types listed in the module docstring as described there."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=str, decoder=codec.JsonText)
    await conn.set_type_codec(
        "interval", schema="pg_catalog", encoder=str, decoder=codec.IntervalText
    )
    for name in ("bit", "varbit"):
        await conn.set_type_codec(name, schema="pg_catalog", encoder=str, decoder=str)
    for name, encoder, decoder in _BINARY_CODECS:
        await conn.set_type_codec(
            name, schema="pg_catalog", format="tuple", encoder=encoder, decoder=decoder
        )


# Each decoder runs once per value read: the common case is one step, and a value is looked
# at only when Python cannot hold it.


def _date(parts: tuple[int]) -> dt.date | codec.Special:
    try:
        return dt.date.fromordinal(_Y2K_ORDINAL + parts[0])
    except (ValueError, OverflowError):
        (days,) = parts
        if days in (_DATE_INFINITY, -_DATE_INFINITY - 1):
            return codec.Special("$date", "infinity" if days > 0 else "-infinity")
        return codec.Special("$date", _far_date(days))


def _far_date(days: int) -> str:
    # ISO 8601's expanded years: a sign past 9999 and before year 0, which is 1 BC. The date
    # is found 400-year cycles away, inside the years Python knows.
    cycles, rest = divmod(days, _GREGORIAN_CYCLE_DAYS)
    day = _Y2K + dt.timedelta(days=rest)
    year = day.year + 400 * cycles
    sign = "+" if year > 9999 else "-" if year < 0 else ""
    return f"{sign}{abs(year):04d}-{day.month:02d}-{day.day:02d}"


def _timestamp(parts: tuple[int]) -> dt.datetime | codec.Special:
    # timedelta's arguments are days, seconds and microseconds; keywords cost a tenth more.
    try:
        return _Y2K_NAIVE + dt.timedelta(0, 0, parts[0])
    except OverflowError:
        return _far_instant(parts[0], "$ts", "")


def _timestamptz(parts: tuple[int]) -> dt.datetime | codec.Special:
    try:
        return _Y2K_UTC + dt.timedelta(0, 0, parts[0])
    except OverflowError:
        return _far_instant(parts[0], "$tstz", "+00:00")


def _far_instant(micros: int, tag: str, zone: str) -> codec.Special:
    if micros in (_TS_INFINITY, -_TS_INFINITY - 1):
        return codec.Special(tag, "infinity" if micros > 0 else "-infinity")
    days, clock = divmod(micros, _DAY_US)
    return codec.Special(tag, f"{_far_date(days)}T{_clock(clock).isoformat('microseconds')}{zone}")


def _clock(micros: int) -> dt.time:
    seconds, fraction = divmod(micros, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return dt.time(hour, minute, second, fraction)


def _time(parts: tuple[int]) -> dt.time | codec.Special:
    (micros,) = parts
    if micros == _DAY_US:
        return codec.Special("$time", "24:00:00.000000")
    return _clock(micros)


def _timetz(parts: tuple[int, int]) -> dt.time | codec.Special:
    # The server sends the zone's offset in seconds west of UTC.
    micros, west_s = parts
    zone = dt.timezone(dt.timedelta(seconds=-west_s))
    if micros == _DAY_US:
        offset = dt.time(tzinfo=zone).isoformat("microseconds")[len("00:00:00.000000") :]
        return codec.Special("$timetz", f"24:00:00.000000{offset}")
    return _clock(micros).replace(tzinfo=zone)


def _micros_of_day(value: dt.time) -> int:
    return ((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond


# Encoders for query parameters, the inverse of the decoders for the values Python holds.
_BINARY_CODECS: list[tuple[str, Any, Any]] = [
    ("date", lambda value: ((value - _Y2K).days,), _date),
    ("timestamp", lambda value: ((value - _Y2K_NAIVE) // _MICROSECOND,), _timestamp),
    ("timestamptz", lambda value: ((value - _Y2K_UTC) // _MICROSECOND,), _timestamptz),
    ("time", lambda value: (_micros_of_day(value),), _time),
    (
        "timetz",
        lambda value: (_micros_of_day(value), -value.utcoffset() // dt.timedelta(seconds=1)),
        _timetz,
    ),
]
