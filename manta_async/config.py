"""The configuration file: TOML, checked by pydantic, with ${VAR} read from the environment.

Every error names the file, the key and the bad value, for example
``conf/shop.toml: tables.orders.key: must list at least one column (got [])``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manta_async.errors import ConfigError

_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$"
_NAME_RULE = "must start with a letter or '_' and hold only letters, digits, _ - ."
SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "sqlite")

PositiveInt = Annotated[int, Field(gt=0)]
Share = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by ***, fit for messages and logs."""
    parts = urlsplit(url)
    userinfo, at, hostinfo = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _check_name(name: str) -> str:
    if not re.match(_NAME, name):
        raise ValueError(_NAME_RULE)
    return name


class AgentConfig(_Section):
    name: str
    state_dir: Path = Path("state")
    chunk_rows: PositiveInt = 5000
    batch_rows: PositiveInt = 5000
    batch_bytes: PositiveInt = 4 * 1024 * 1024
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_delete_share: Share = 0.5
    """A table's run that would delete more than this share of its rows stops and asks for
    `run --once --allow-mass-delete`; 1 turns the guard off. Per table under [tables.X]."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return _check_name(name)


class StoreConfig(_Section):
    url: str
    token: str = ""
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retry_for_s: Annotated[float, Field(ge=0)] = 60.0
    """How long `run --once` keeps retrying a store that does not answer before it stops and
    leaves the batches queued. `serve` retries without end."""
    max_backoff_s: Annotated[float, Field(gt=0)] = 30.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return url.rstrip("/")


class SourceConfig(_Section):
    url: str
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = urlsplit(url).scheme
        if scheme not in SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(SCHEMES)}")
        return url

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme


class TableConfig(_Section):
    source: str
    sql: Annotated[str, Field(min_length=1)]
    key: list[str] | None = None
    """Key columns. Without them the whole row is its identity and duplicates are counted."""
    max_delete_share: Share | None = None
    """Overrides [agent] max_delete_share for this table."""
    hash_in_source: bool = True
    """Read the table by buckets of keys, so a run reads only the buckets whose sums changed
    (docs/performance.md): PostgreSQL and MariaDB hash their own rows, a SQLite source's rows
    are hashed by the agent as it reads them. False reads and diffs every row each run."""

    @field_validator("key")
    @classmethod
    def _nonempty_key(cls, key: list[str] | None) -> list[str] | None:
        if key is not None and not key:
            raise ValueError("must list at least one column, or be left out for a keyless table")
        if key is not None and len(set(key)) != len(key):
            raise ValueError("lists a column twice")
        return key


class Config(_Section):
    agent: AgentConfig
    store: StoreConfig
    sources: dict[str, SourceConfig]
    tables: dict[str, TableConfig]
    path: Path = Path("manta.toml")
    """Where the config was read from; relative paths in it are relative to its folder."""

    @model_validator(mode="after")
    def _tables_name_sources(self) -> Config:
        for name, table in self.tables.items():
            if not re.match(_NAME, name):
                raise ValueError(f"table name {name!r} {_NAME_RULE}")
            if table.source not in self.sources:
                known = ", ".join(sorted(self.sources)) or "none"
                raise ValueError(
                    f"table {name!r} names source {table.source!r}, which is not defined "
                    f"under [sources] (defined: {known})"
                )
        return self

    @property
    def state_dir(self) -> Path:
        return (self.path.parent / self.agent.state_dir).resolve()

    def source_for(self, table: str) -> SourceConfig:
        return self.sources[self.tables[table].source]

    def max_delete_share(self, table: str) -> float:
        """The share of its rows a run of `table` may delete without confirmation."""
        own = self.tables[table].max_delete_share
        return self.agent.max_delete_share if own is None else own


def _expand(value: Any, where: str, path: Path) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}" if where else k, path) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(
                f"{path}: {where}: environment variable {name} is not set; "
                f"export it or write the value into the file"
            )
        return os.environ[name]

    return _ENV_VAR.sub(replace, value)


def _describe(error: ValidationError, path: Path, raw: dict[str, Any]) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; check its spelling"
        elif item["type"] == "missing":
            message = "is required"
        value = item["input"]
        if isinstance(value, str) and item["loc"] and item["loc"][-1] == "url":
            value = mask_url(value)
        shown = "" if item["type"] == "missing" else f" (got {value!r})"
        if item["type"] == "extra_forbidden":
            shown = ""
        lines.append(f"{path}: {where}: {message}{shown}")
    return "\n".join(lines)


def parse_config(text: str, path: Path) -> Config:
    """Return the config in `text`, read from `path`; raise ConfigError naming what is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    raw = _expand(raw, "", path)
    raw["path"] = path
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path, raw)) from exc


def load_config(path: Path) -> Config:
    """Read and check the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: no such config file; pass one with --config or see conf/example.toml"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    return parse_config(text, path)
