"""The appliance's configuration: `HOME/config.toml`, rendered and loaded here.

`render_config` writes a complete, commented TOML file from an `ApplianceConfig`, and
`load_config` reads it back (`load_config(home) == config` for a rendered config). The
annotated example in `config/appliance.example.toml` is `render_config(example_config())`;
regenerate it with `python -m appliance.config > config/appliance.example.toml`.

Paths in the file may be relative; they are resolved against the home folder, so a home can
be moved as a whole. Every value is checked on load, and a bad one raises `ConfigError` with
a message naming the file, the setting and what is expected.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.errors import ConfigError
from appliance.storage.settings import (
    DEFAULT_RESERVE_FREE_BYTES,
    DEFAULT_SMALL_BLOCK_LIMIT,
    DiskSpec,
    StoreSettings,
)
from protocol.mdns import DEFAULT_PORT

CONFIG_NAME = "config.toml"
CONFIG_FORMAT = 1
DEFAULT_LISTEN_HOST = "127.0.0.1"
DEFAULT_LISTEN_PORT = DEFAULT_PORT
DEFAULT_SCRUB_RATE_MB_PER_S = 20.0
DEFAULT_FULL_SCRUB_INTERVAL_S = 7 * 24 * 3600.0
DEFAULT_DATABASE = Path("appliance.db")
DEFAULT_TLS_CERTIFICATE = Path("tls/cert.pem")
DEFAULT_TLS_KEY = Path("tls/key.pem")
DEFAULT_URL_LIFETIME_S = 3600.0
DEFAULT_RATE_LIMIT_PER_S = 500.0
DEFAULT_RATE_LIMIT_BURST = 5000
DEFAULT_CODE_LIFETIME_S = 24 * 3600.0
DEFAULT_GC_GRACE_S = 7 * 24 * 3600.0
DEFAULT_GC_INTERVAL_S = 3600.0
DEFAULT_HOME_COPY_INTERVAL_S = 5.0
_DAY = 24 * 3600.0


@dataclass(frozen=True)
class ApplianceConfig:
    """Everything `cairnd serve` needs. Paths are absolute (resolved against `home`)."""

    home: Path
    store: StoreSettings
    listen_host: str = DEFAULT_LISTEN_HOST
    listen_port: int = DEFAULT_LISTEN_PORT
    scrub_rate_mb_per_s: float = DEFAULT_SCRUB_RATE_MB_PER_S
    full_scrub_interval_s: float = DEFAULT_FULL_SCRUB_INTERVAL_S
    tls_certificate: Path = DEFAULT_TLS_CERTIFICATE
    tls_key: Path = DEFAULT_TLS_KEY
    database: Path = DEFAULT_DATABASE
    url_lifetime_s: float = DEFAULT_URL_LIFETIME_S
    rate_limit_per_s: float = DEFAULT_RATE_LIMIT_PER_S
    rate_limit_burst: int = DEFAULT_RATE_LIMIT_BURST
    enrollment_code_lifetime_s: float = DEFAULT_CODE_LIFETIME_S
    advertise: bool = True
    lan_admission: bool = True
    gc_grace_s: float = DEFAULT_GC_GRACE_S
    gc_interval_s: float = DEFAULT_GC_INTERVAL_S
    home_copy_interval_s: float = DEFAULT_HOME_COPY_INTERVAL_S

    @property
    def appliance_id(self) -> str:
        return self.store.appliance_id

    @property
    def listen(self) -> str:
        return format_listen(self.listen_host, self.listen_port)

    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_NAME

    def with_listen(self, host: str, port: int) -> ApplianceConfig:
        return replace(self, listen_host=host, listen_port=port)


# --- listen addresses ----------------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` → (host, port). IPv6 hosts go in brackets: `[::1]:8443`. Port 0 means
    "any free port" (the serve line and run/serve.json say which one was taken)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"listen address {text!r}: expected [IPV6]:PORT, e.g. [::1]:8443")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"listen address {text!r}: {host!r} is not an IPv6 address") \
                from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"listen address {text!r}: expected HOST:PORT, "
                              "e.g. 127.0.0.1:8443")
        if ":" in host:
            raise ConfigError(f"listen address {text!r}: put an IPv6 host in brackets, "
                              "e.g. [::1]:8443")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"listen address {text!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


def format_listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- rendering -----------------------------------------------------------------------------

def _toml_str(value: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes for what JSON emits).
    return json.dumps(value, ensure_ascii=False)


def _toml_float(value: float) -> str:
    text = repr(float(value))
    return text if any(c in text for c in ".en") else text + ".0"


def _relative_to_home(path: Path, home: Path) -> str:
    """Write paths inside the home relative to it (the home stays movable)."""
    if path.is_absolute() and path.is_relative_to(home):
        return str(path.relative_to(home))
    return str(path)


def render_config(config: ApplianceConfig) -> str:
    """The config as a commented TOML document that `load_config` reads back unchanged."""
    s = config.store
    home = config.home

    def rel(path: Path) -> str:
        return _toml_str(_relative_to_home(path, home))

    lines = [
        "# Cairn appliance configuration.",
        "#",
        "# Written by `cairnd init`; read by every `cairnd` command that takes --home.",
        "# Relative paths are resolved against the folder holding this file (the home).",
        "# Edit while the appliance is stopped, then start it again.",
        "",
        "# Version of this file's layout; cairnd refuses files from a newer version.",
        f"format = {CONFIG_FORMAT}",
        "",
        "[appliance]",
        "# This appliance's identity, chosen at init. It is written into every disk's marker",
        "# file, so a disk from another appliance is never mistaken for one of ours.",
        "# Never change it: the disks would then count as foreign.",
        f"id = {_toml_str(s.appliance_id)}",
        "",
        "[server]",
        "# Where the HTTPS API listens, as HOST:PORT ([IPV6]:PORT for IPv6). 127.0.0.1 keeps",
        "# the appliance to this machine; use the LAN address (or 0.0.0.0) to serve devices.",
        "# Port 0 picks a free port. `cairnd serve --listen` overrides this for one run.",
        f"listen = {_toml_str(config.listen)}",
        "# TLS is always on. cairnd init makes a self-signed certificate (ECDSA P-256, valid",
        "# 10 years); agents pin its SHA-256 fingerprint, which `cairnd serve` prints. To use",
        "# another certificate, point these at its PEM files. The key must not be readable",
        "# by others.",
        f"tls_certificate = {rel(config.tls_certificate)}",
        f"tls_key = {rel(config.tls_key)}",
        "",
        "[api]",
        "# Pre-signed block URLs stay valid this many seconds.",
        f"url_lifetime_s = {_toml_float(config.url_lifetime_s)}",
        "# Each device may make this many requests per second on average, in bursts of up",
        "# to rate_limit_burst; beyond that it gets 429 with Retry-After.",
        f"rate_limit_per_s = {_toml_float(config.rate_limit_per_s)}",
        f"rate_limit_burst = {config.rate_limit_burst}",
        "# How long a code from `cairnd user add` / `cairnd user code` stays valid, in hours.",
        f"enrollment_code_hours = {_toml_float(config.enrollment_code_lifetime_s / 3600)}",
        "",
        "[enrollment]",
        "# Whether a user's enrolled device may admit a new device of the same user that",
        "# asks on the LAN (`cairn join --lan`, approved with `cairn approve` and a code both",
        "# screens show), without an enrollment code from this console. Every admission is",
        "# logged. false: new devices join only with `cairnd user code` codes.",
        f"lan_admission = {'true' if config.lan_admission else 'false'}",
        "",
        "[discovery]",
        "# Announce the appliance on the LAN by mDNS (_cairn._tcp) so devices find it, on",
        "# the interfaces whose addresses it listens on (never when listening on loopback).",
        f"advertise = {'true' if config.advertise else 'false'}",
        "",
        "[gc]",
        "# Blocks no file needs any more, and deleted files, are kept this many days before",
        "# their space is reclaimed; until then a deleted file can be restored.",
        f"grace_days = {_toml_float(config.gc_grace_s / _DAY)}",
        "# How often garbage collection runs while serving, in hours.",
        f"interval_hours = {_toml_float(config.gc_interval_s / 3600)}",
        "",
        "[durability]",
        "# While serving, the database, config, TLS key pair and secrets are copied onto",
        "# parity_shards + 1 of the data disks (`cairn-home/` there) this often, in seconds,",
        "# when something changed, and once more at a clean stop. `cairnd recover` rebuilds",
        "# a lost home from those copies; a crash together with the loss of this home loses",
        "# at most the changes of the last interval (devices then send them again).",
        f"home_copy_interval_s = {_toml_float(config.home_copy_interval_s)}",
        "",
        "[database]",
        "# The SQLite database (WAL mode) holding metadata and the repair queue. Keep it on",
        "# a reliable disk: it is not erasure coded.",
        f"path = {rel(config.database)}",
        "",
        "[storage]",
        "# Each block is cut into data_shards pieces plus parity_shards parity pieces, all on",
        "# different disks: any data_shards of them rebuild the block, so up to parity_shards",
        "# disks can fail at once. Raw space used is (data + parity) / data times the data",
        "# (1.5x for 4+2). Needs at least data_shards + parity_shards disks. Changing these",
        "# later affects new blocks only.",
        f"data_shards = {s.data_shards}",
        f"parity_shards = {s.parity_shards}",
        "# Blocks up to this many bytes are stored as parity_shards + 1 full copies instead,",
        "# packed as rows of each disk's small-shards.sqlite (same tolerance of parity_shards",
        "# failures; thousands of small files a second instead of one new file per copy).",
        f"small_block_limit = {s.small_block_limit}",
        "# Stop writing to a disk when its free space falls below this many bytes (it stays",
        "# readable, and is reported as `full`). 0 uses every byte.",
        f"reserve_free_bytes = {s.reserve_free_bytes}",
        "",
        "[maintenance]",
        "# While serving, the appliance verifies every shard in the background and repairs",
        "# what is missing or corrupt. This caps the reading it does, in megabytes (10^6",
        "# bytes) per second, so it does not compete with users.",
        f"scrub_rate_mb_per_s = {_toml_float(config.scrub_rate_mb_per_s)}",
        "# How often a full background scrub starts, in days (fractions allowed).",
        f"full_scrub_interval_days = {_toml_float(config.full_scrub_interval_s / _DAY)}",
        "",
        "# The disks, one [[disks]] table each. `name` is the slot's stable name (it decides",
        "# which shards belong where; never rename). `path` is the disk's folder: use the",
        "# mount point of a real disk, with require_mount = true, so that an unmounted disk",
        "# is reported missing instead of being filled in the root filesystem. A replaced disk",
        "# (an empty folder at the same path) is rebuilt by `cairnd scrub`. `weight` scales",
        "# the disk's share of new shards: when disk sizes differ, give each its size in TB.",
    ]
    for disk in s.disks:
        lines += [
            "",
            "[[disks]]",
            f"name = {_toml_str(disk.name)}",
            f"path = {rel(disk.path)}",
            f"require_mount = {'true' if disk.require_mount else 'false'}",
            f"weight = {_toml_float(disk.weight)}",
        ]
    return "\n".join(lines) + "\n"


def example_config() -> ApplianceConfig:
    """The annotated example in config/: a NAS with six mounted disks."""
    home = Path("/var/lib/cairn")
    disks = tuple(DiskSpec(f"disk{i}", Path(f"/srv/cairn/disk{i}"), require_mount=True)
                  for i in range(6))
    return ApplianceConfig(
        home=home,
        store=StoreSettings(appliance_id="3f5e0c1a-8d2b-4c6e-9a7f-0b1c2d3e4f50", disks=disks),
        tls_certificate=home / DEFAULT_TLS_CERTIFICATE,
        tls_key=home / DEFAULT_TLS_KEY,
        database=home / DEFAULT_DATABASE,
    )


def write_config(config: ApplianceConfig) -> None:
    """Write HOME/config.toml atomically (temp file, fsync, rename)."""
    path = config.config_path
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(render_config(config))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


# --- loading ------------------------------------------------------------------------------

class _Section:
    """Typed access to one table of the file, with errors that name file and key."""

    def __init__(self, path: Path, name: str, table: Mapping[str, Any]) -> None:
        self.path = path
        self.name = name
        self.table = table
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key} {problem}")

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is _REQUIRED:
                raise self.error(key, "is missing")
            return default
        return self.table[key]

    def string(self, key: str, default: Any = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {value!r}")
        if value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def positive_number(self, key: str, default: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        if not value > 0 or value != value or value == float("inf"):
            raise self.error(key, f"must be a number greater than 0, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def path_value(self, key: str, default: Path | None, home: Path) -> Path:
        text = self.string(key, None if default is None else str(default))
        return home / Path(text).expanduser()

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(f"{self.path}: [{self.name}] unknown setting "
                              f"{', '.join(unknown)} (misspelt?)")


_REQUIRED: Any = object()
_SECTIONS = ("appliance", "server", "api", "enrollment", "discovery", "gc", "database",
             "storage", "maintenance", "durability")


def _table(path: Path, document: Mapping[str, Any], name: str) -> _Section:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return _Section(path, name, table)


def _load_disks(path: Path, document: Mapping[str, Any], home: Path) -> tuple[DiskSpec, ...]:
    entries = document.get("disks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: no disks configured; add [[disks]] tables with name and "
                          "path")
    disks = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: disks entry {number} must be a [[disks]] table")
        section = _Section(path, f"disks #{number}", entry)
        name = section.string("name")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise section.error("name", f"may use only letters, digits, '-', '_' and '.', "
                                        f"got {name!r}")
        disks.append(DiskSpec(name=name, path=section.path_value("path", None, home),
                              require_mount=section.boolean("require_mount", False),
                              weight=section.positive_number("weight", 1.0)))
        section.check_unknown()
    return tuple(disks)


def load_config(home: Path) -> ApplianceConfig:
    """Read and check HOME/config.toml. Raises ConfigError naming the problem."""
    home = Path(home).expanduser().absolute()
    path = home / CONFIG_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if home.exists():
            raise ConfigError(f"{home} is not an appliance home: no {CONFIG_NAME} "
                              f"(create one with `cairnd init --home {home}`)") from None
        raise ConfigError(f"appliance home {home} does not exist "
                          f"(create it with `cairnd init --home {home}`)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None

    top = _Section(path, "top level", document)
    version = top.integer("format", CONFIG_FORMAT, minimum=1)
    if version > CONFIG_FORMAT:
        raise ConfigError(f"{path}: format {version} is newer than this cairnd understands "
                          f"({CONFIG_FORMAT}); upgrade cairnd")
    top.used.update((*_SECTIONS, "disks"))
    top.check_unknown()

    appliance = _table(path, document, "appliance")
    server = _table(path, document, "server")
    database = _table(path, document, "database")
    storage = _table(path, document, "storage")
    maintenance = _table(path, document, "maintenance")
    api = _table(path, document, "api")
    enrollment = _table(path, document, "enrollment")
    discovery = _table(path, document, "discovery")
    gc = _table(path, document, "gc")
    durability = _table(path, document, "durability")

    appliance_id = appliance.string("id")
    try:
        host, port = parse_listen(server.string(
            "listen", format_listen(DEFAULT_LISTEN_HOST, DEFAULT_LISTEN_PORT)))
    except ConfigError as exc:
        raise server.error("listen", f"is invalid: {exc.message}") from None
    tls_certificate = server.path_value("tls_certificate", DEFAULT_TLS_CERTIFICATE, home)
    tls_key = server.path_value("tls_key", DEFAULT_TLS_KEY, home)
    database_path = database.path_value("path", DEFAULT_DATABASE, home)
    data_shards = storage.integer("data_shards", 4, minimum=1)
    parity_shards = storage.integer("parity_shards", 2, minimum=1)
    small_block_limit = storage.integer("small_block_limit", DEFAULT_SMALL_BLOCK_LIMIT)
    reserve_free_bytes = storage.integer("reserve_free_bytes", DEFAULT_RESERVE_FREE_BYTES)
    scrub_rate = maintenance.positive_number("scrub_rate_mb_per_s", DEFAULT_SCRUB_RATE_MB_PER_S)
    interval_days = maintenance.positive_number(
        "full_scrub_interval_days", DEFAULT_FULL_SCRUB_INTERVAL_S / _DAY)
    url_lifetime_s = api.positive_number("url_lifetime_s", DEFAULT_URL_LIFETIME_S)
    rate_limit_per_s = api.positive_number("rate_limit_per_s", DEFAULT_RATE_LIMIT_PER_S)
    rate_limit_burst = api.integer("rate_limit_burst", DEFAULT_RATE_LIMIT_BURST, minimum=1)
    code_hours = api.positive_number("enrollment_code_hours", DEFAULT_CODE_LIFETIME_S / 3600)
    lan_admission = enrollment.boolean("lan_admission", True)
    advertise = discovery.boolean("advertise", True)
    grace_days = gc.positive_number("grace_days", DEFAULT_GC_GRACE_S / _DAY)
    gc_interval_hours = gc.positive_number("interval_hours", DEFAULT_GC_INTERVAL_S / 3600)
    copy_interval = durability.positive_number("home_copy_interval_s",
                                               DEFAULT_HOME_COPY_INTERVAL_S)
    for section in (appliance, server, database, storage, maintenance, api, enrollment,
                    discovery, gc, durability):
        section.check_unknown()

    disks = _load_disks(path, document, home)
    try:
        settings = StoreSettings(
            appliance_id=appliance_id, disks=disks, data_shards=data_shards,
            parity_shards=parity_shards, small_block_limit=small_block_limit,
            reserve_free_bytes=reserve_free_bytes)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return ApplianceConfig(
        home=home, store=settings, listen_host=host, listen_port=port,
        scrub_rate_mb_per_s=scrub_rate, full_scrub_interval_s=interval_days * _DAY,
        tls_certificate=tls_certificate, tls_key=tls_key, database=database_path,
        url_lifetime_s=url_lifetime_s, rate_limit_per_s=rate_limit_per_s,
        rate_limit_burst=rate_limit_burst, enrollment_code_lifetime_s=code_hours * 3600,
        advertise=advertise, lan_admission=lan_admission, gc_grace_s=grace_days * _DAY,
        gc_interval_s=gc_interval_hours * 3600, home_copy_interval_s=copy_interval)


if __name__ == "__main__":  # regenerate config/appliance.example.toml
    sys.stdout.write(render_config(example_config()))
