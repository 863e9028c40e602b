"""The config file: errors name the file, the key and the bad value; ${VAR} is expanded."""

from __future__ import annotations

from pathlib import Path

import pytest

from manta_async.config import load_config, parse_config
from manta_async.errors import ConfigError

GOOD = """
[agent]
name = "shop-eu"
[store]
url = "http://127.0.0.1:8640/"
token = "${TEST_MANTA_TOKEN}"
[sources.shop]
url = "sqlite:///shop.db"
[tables.orders]
source = "shop"
key = ["id"]
sql = "SELECT * FROM orders"
[tables.tags]
source = "shop"
sql = "SELECT * FROM tags"
"""


def test_good_config_is_read_with_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_MANTA_TOKEN", "s3cret")
    config = parse_config(GOOD, tmp_path / "shop.toml")
    assert config.store.token == "s3cret"
    assert config.store.url == "http://127.0.0.1:8640"
    assert config.tables["orders"].key == ["id"] and config.tables["tags"].key is None
    assert config.agent.chunk_rows == 5000
    assert config.state_dir == (tmp_path / "state").resolve()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('name = "shop-eu"', 'name = "shop eu"'), "x.toml: agent.name: must start with"),
        (("[agent]", "[agent]\nchunk_rows = 0"), "agent.chunk_rows: Input should be greater"),
        (('key = ["id"]', "key = []"), "tables.orders.key: must list at least one column"),
        (('key = ["id"]', 'key = ["id", "id"]'), "tables.orders.key: lists a column twice"),
        (('source = "shop"', 'source = "shp"'), "names source 'shp', which is not defined"),
        (("sqlite:///", "oracle://"), "sources.shop.url: the scheme must be one of"),
        (("[store]", "[store]\ntokn = 1"), "store.tokn: unknown key; check its spelling"),
        (('url = "http://127.0.0.1:8640/"', 'url = "127.0.0.1"'), "store.url: must be an http"),
        (("[agent]", "[agent"), "x.toml: not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_value(
    monkeypatch: pytest.MonkeyPatch, change: tuple[str, str], message: str
) -> None:
    monkeypatch.setenv("TEST_MANTA_TOKEN", "t")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_config(GOOD.replace(*change, 1), Path("x.toml"))


def test_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_MANTA_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="store.token: environment variable TEST_MANTA_TOKEN"):
        parse_config(GOOD, Path("x.toml"))


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file; pass one with --config"):
        load_config(tmp_path / "absent.toml")


def test_bad_source_url_is_shown_without_its_password() -> None:
    text = GOOD.replace("sqlite:///shop.db", "oracle://app:hunter2@db:1521/shop")
    with pytest.raises(ConfigError) as failure:
        parse_config(text.replace("${TEST_MANTA_TOKEN}", "t"), Path("x.toml"))
    assert "oracle://app:***@db:1521/shop" in str(failure.value)
    assert "hunter2" not in str(failure.value)
