"""config.toml: render/load round trips, the annotated example, and clear errors."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import (
    CONFIG_NAME,
    ApplianceConfig,
    example_config,
    format_listen,
    load_config,
    parse_listen,
    render_config,
)
from appliance.errors import ConfigError
from appliance.storage.settings import DiskSpec, StoreSettings

REPO = Path(__file__).resolve().parents[2]


def make_config(home: Path, **changes: object) -> ApplianceConfig:
    disks = tuple(DiskSpec(f"disk{i}", home / "disks" / f"disk{i}") for i in range(6))
    config = ApplianceConfig(
        home=home,
        store=StoreSettings(appliance_id="a1b2c3", disks=disks),
        tls_certificate=home / "tls/cert.pem",
        tls_key=home / "tls/key.pem",
        database=home / "appliance.db",
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def write(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / CONFIG_NAME).write_text(text)


def test_defaults_round_trip(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    write(tmp_path, render_config(config))
    assert load_config(tmp_path) == config
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8443)
    assert config.scrub_rate_mb_per_s == 20
    assert config.full_scrub_interval_s == 7 * 24 * 3600


def test_paths_inside_home_are_written_relative(tmp_path: Path) -> None:
    text = render_config(make_config(tmp_path))
    assert str(tmp_path) not in text
    assert 'path = "disks/disk0"' in text
    assert 'tls_key = "tls/key.pem"' in text


def test_everything_non_default_round_trips(tmp_path: Path) -> None:
    home = tmp_path / "home"
    outside = tmp_path / "mnt"
    disks = (DiskSpec("disk0", outside / "a", require_mount=True, weight=2.5),
             DiskSpec("disk1", outside / 'we"ird \\ name', weight=0.5),
             DiskSpec("disk2", home / "d2"))
    config = make_config(
        home,
        store=StoreSettings(appliance_id="x-y_z", disks=disks, data_shards=2,
                            parity_shards=1, small_block_limit=0, reserve_free_bytes=10**12),
        listen_host="::1", listen_port=0, scrub_rate_mb_per_s=0.25,
        full_scrub_interval_s=12 * 3600.0,
        tls_certificate=outside / "cert.pem", tls_key=home / "k.pem",
        database=home / "db" / "x.db", lan_admission=False)
    write(home, render_config(config))
    assert load_config(home) == config


@settings(max_examples=50, deadline=None)
@given(
    data_shards=st.integers(1, 8),
    parity_shards=st.integers(1, 4),
    extra_disks=st.integers(0, 3),
    port=st.integers(0, 65535),
    rate=st.floats(0.001, 1e6, allow_nan=False),
    hours=st.integers(1, 24 * 400),
    mounts=st.lists(st.booleans(), min_size=15, max_size=15),
    appliance_id=st.from_regex(r"[a-z0-9-]{1,40}", fullmatch=True),
)
def test_render_load_round_trip_property(
    tmp_path_factory: pytest.TempPathFactory, data_shards: int, parity_shards: int,
    extra_disks: int, port: int, rate: float, hours: int, mounts: list[bool],
    appliance_id: str,
) -> None:
    home = tmp_path_factory.mktemp("home")
    count = data_shards + parity_shards + extra_disks
    disks = tuple(DiskSpec(f"disk{i}", home / "disks" / f"disk{i}", mounts[i])
                  for i in range(count))
    config = make_config(
        home, store=StoreSettings(appliance_id, disks, data_shards, parity_shards),
        listen_port=port, scrub_rate_mb_per_s=rate, full_scrub_interval_s=hours * 3600.0)
    write(home, render_config(config))
    assert load_config(home) == config


def test_every_setting_is_explained(tmp_path: Path) -> None:
    """Each `key = value` line follows a comment or another setting of its group."""
    lines = render_config(make_config(tmp_path)).splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\w+ = ", line) and lines[number - 1].startswith("["):
            header = lines[number - 1]
            assert header == "[[disks]]", f"{line!r} under {header} has no comment"


def test_example_file_matches_renderer() -> None:
    example = (REPO / "config" / "appliance.example.toml").read_text()
    assert example == render_config(example_config()), (
        "config/appliance.example.toml is stale: regenerate it with "
        "`python -m appliance.config > config/appliance.example.toml`")


def test_example_loads(tmp_path: Path) -> None:
    example = (REPO / "config" / "appliance.example.toml").read_text()
    write(tmp_path, example)
    config = load_config(tmp_path)
    assert config.store.disks[0].require_mount
    assert config.store.disks[0].path == Path("/srv/cairn/disk0")
    assert config.database == tmp_path / "appliance.db"


@pytest.mark.parametrize(("text", "port"), [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:65535", ("::1", 65535)),
    (" nas.local:443 ", ("nas.local", 443)),
])
def test_parse_listen(text: str, port: tuple[str, int]) -> None:
    assert parse_listen(text) == port
    assert parse_listen(format_listen(*port)) == port


@pytest.mark.parametrize("text", [
    "127.0.0.1", "127.0.0.1:", ":8443", "127.0.0.1:http", "127.0.0.1:65536", "::1:8443",
    "[::1]8443", "[nope]:1", "[::1]", "127.0.0.1:-1",
])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="listen address"):
        parse_listen(text)


def _replace_line(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("data_shards = 4", 'data_shards = "four"',
     r"\[storage\] data_shards must be a whole number, got 'four'"),
    ("parity_shards = 2", "parity_shards = 0",
     r"\[storage\] parity_shards must be at least 1, got 0"),
    ("data_shards = 4", "data_shards = 5",
     r"5\+2 shards need at least 7 disks, 6 configured"),
    ("data_shards = 4", "data_shards = true", r"data_shards must be a whole number"),
    ('listen = "127.0.0.1:8443"', 'listen = "127.0.0.1"',
     r"\[server\] listen is invalid: .*expected HOST:PORT"),
    ('listen = "127.0.0.1:8443"', "listen = 8443", r"\[server\] listen must be a non-empty"),
    ("scrub_rate_mb_per_s = 20.0", "scrub_rate_mb_per_s = -1",
     r"scrub_rate_mb_per_s must be a number greater than 0, got -1"),
    ("scrub_rate_mb_per_s = 20.0", "scrub_rate_mb_per_s = nan",
     r"scrub_rate_mb_per_s must be a number greater than 0"),
    ("full_scrub_interval_days = 7.0", 'full_scrub_interval_days = "weekly"',
     r"full_scrub_interval_days must be a number, got 'weekly'"),
    ("data_shards = 4", "data_shards = 4\ndata_shard = 3",
     r"\[storage\] unknown setting data_shard \(misspelt\?\)"),
    ("[maintenance]", "[maintenence]", r"top level\] unknown setting maintenence"),
    ("require_mount = false", 'require_mount = "no"',
     r"\[disks #1\] require_mount must be true or false, got 'no'"),
    ('name = "disk1"', 'name = "disk0"', r"disk names must be unique"),
    ('name = "disk1"', 'name = "disk/1"', r"\[disks #2\] name may use only"),
    ('id = "a1b2c3"', 'id = ""', r"\[appliance\] id must be a non-empty string"),
    ('id = "a1b2c3"', "", r"\[appliance\] id is missing"),
    ("format = 1", "format = 9", r"format 9 is newer than this cairnd understands"),
    ("weight = 1.0", "weight = 0", r"weight must be a number greater than 0"),
    ("[storage]", "[storage", r"is not valid TOML"),
])
def test_bad_values_give_clear_errors(tmp_path: Path, old: str, new: str,
                                      expected: str) -> None:
    write(tmp_path, _replace_line(render_config(make_config(tmp_path)), old, new))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    message = caught.value.message
    assert re.search(expected, message), message
    assert "\n" not in message
    if "not valid TOML" not in message:
        assert message.startswith(str(tmp_path / CONFIG_NAME))


def test_no_disks(tmp_path: Path) -> None:
    text = render_config(make_config(tmp_path))
    write(tmp_path, text[:text.index("[[disks]]")])
    with pytest.raises(ConfigError, match=r"no disks configured"):
        load_config(tmp_path)


def test_missing_home_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist \(create it with `cairnd init"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"is not an appliance home: no config.toml"):
        load_config(tmp_path)


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    text = render_config(make_config(tmp_path))
    text = text.replace("[database]\n", "[database_old]\n").replace(
        "format = 1", "format = 1\ndatabase = 3")
    write(tmp_path, text)
    with pytest.raises(ConfigError, match=r"unknown setting database_old"):
        load_config(tmp_path)
    write(tmp_path, text.replace("[database_old]", "[server.database_old]"))
    with pytest.raises(ConfigError, match=r"\[database\] must be a table"):
        load_config(tmp_path)
