"""A table's shape: its column names and the logical kind of each column.

Two results have the same shape when they have the same column names, in the same order, of
the same kinds. Kinds group the database types whose values encode alike: int4 and int8 are
both `int`, json and jsonb both `json`, numeric(10,2) and numeric(12,4) both `decimal`. So
widening a column is not a change of shape, while turning text into an integer is; a change of
shape sends the table again in full, and the store replaces its copy at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_KINDS: dict[str, tuple[str, ...]] = {
    "int": ("int2", "int4", "int8", "smallint", "integer", "bigint", "int", "tinyint",
            "mediumint", "year", "oid", "serial", "bigserial"),
    "float": ("float4", "float8", "real", "double", "double precision", "float"),
    "decimal": ("numeric", "decimal", "newdecimal", "money"),
    "bool": ("bool", "boolean"),
    "text": ("text", "varchar", "char", "bpchar", "name", "character varying", "character",
             "string", "var_string", "tinytext", "mediumtext", "longtext", "enum", "set",
             "citext", "xml"),
    "bytes": ("bytea", "blob", "tinyblob", "mediumblob", "longblob", "binary", "varbinary",
              "bit", "geometry"),
    "json": ("json", "jsonb"),
    "date": ("date", "newdate"),
    "timestamp": ("timestamp", "datetime", "timestamp without time zone"),
    "timestamptz": ("timestamptz", "timestamp with time zone"),
    "time": ("time", "time without time zone"),
    "timetz": ("timetz", "time with time zone"),
    "interval": ("interval",),
    "uuid": ("uuid",),
    "inet": ("inet", "cidr", "macaddr", "macaddr8"),
}  # fmt: skip
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}


def kind_of(db_type: str) -> str:
    """The logical kind of a database type name; an unknown name is its own kind.

    Array types (PostgreSQL reports them as `_int4` or `int4[]`) are arrays of their
    element's kind.
    """
    name = db_type.strip().lower()
    if name.startswith("_") or name.endswith("[]"):
        return f"{kind_of(name.strip('_').removesuffix('[]'))}[]"
    name = name.split("(")[0].removesuffix(" unsigned").strip()
    return _KIND_OF.get(name, name)


def shape_of(columns: Iterable[Mapping[str, str]]) -> list[tuple[str, str]]:
    """The shape of columns given as {"name", "type"} mappings."""
    return [(column["name"], kind_of(column["type"])) for column in columns]


def describe_change(old: list[tuple[str, str]], new: list[tuple[str, str]]) -> str:
    """Say in words how a shape changed, for the log."""
    old_names = {name: kind for name, kind in old}
    new_names = {name: kind for name, kind in new}
    parts = [f"new column {n}" for n in new_names if n not in old_names]
    parts += [f"column {n} is gone" for n in old_names if n not in new_names]
    parts += [
        f"column {n} is now {new_names[n]} (was {old_names[n]})"
        for n in new_names
        if n in old_names and old_names[n] != new_names[n]
    ]
    return ", ".join(parts) or "the columns are in another order"
