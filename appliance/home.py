"""`cairnd init`: make a new appliance home.

A home holds everything one appliance has besides the disks' contents:

    HOME/config.toml        the settings (appliance.config); its presence marks a complete home
    HOME/appliance.db       the SQLite database (WAL)
    HOME/tls/cert.pem       the self-signed certificate; key.pem beside it (0600)
    HOME/secrets/           the URL signing key (made at first start) and the device CA
                            (appliance/device_ca.py), all 0600
    HOME/disks/disk0..N-1   the disk folders, unless existing mount points were given
    HOME/run/serve.json     written by a running `cairnd serve` (url, port, pid, fingerprint)

config.toml is written last, so an interrupted init leaves no half-made home that looks
valid; a home that init created itself is removed again when init fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from appliance.config import (
    CONFIG_NAME,
    DEFAULT_DATABASE,
    DEFAULT_LISTEN_HOST,
    DEFAULT_LISTEN_PORT,
    DEFAULT_TLS_CERTIFICATE,
    DEFAULT_TLS_KEY,
    ApplianceConfig,
    format_listen,
    parse_listen,
    write_config,
)
from appliance.db import open_database
from appliance.device_ca import make_device_ca, write_device_ca
from appliance.errors import ConfigError, HomeExistsError
from appliance.storage.disk import format_disk
from appliance.storage.settings import (
    DEFAULT_RESERVE_FREE_BYTES,
    DEFAULT_SMALL_BLOCK_LIMIT,
    DiskSpec,
    StoreSettings,
)
from appliance.tls import write_self_signed_certificate

DEFAULT_DISKS = 6
DEFAULT_LISTEN = format_listen(DEFAULT_LISTEN_HOST, DEFAULT_LISTEN_PORT)
DISKS_DIR = "disks"
MAX_DISKS = 256


def check_home_is_free(home: Path) -> None:
    """Raise HomeExistsError unless `home` is absent or an empty folder."""
    if (home / CONFIG_NAME).exists():
        raise HomeExistsError(f"{home} already holds an appliance ({CONFIG_NAME} exists); "
                              "refusing to overwrite it")
    if home.exists() or home.is_symlink():
        if not home.is_dir():
            raise HomeExistsError(f"{home} exists and is not a folder")
        if any(home.iterdir()):
            raise HomeExistsError(f"{home} is not empty; choose a new or empty folder "
                                  "for the appliance home")


def _check_shape(disk_count: int, data_shards: int, parity_shards: int) -> None:
    if data_shards < 1:
        raise ConfigError(f"--data-shards must be at least 1, got {data_shards}")
    if parity_shards < 1:
        raise ConfigError(f"--parity-shards must be at least 1, got {parity_shards}; "
                          "without parity a single failed disk loses data")
    if not 1 <= disk_count <= MAX_DISKS:
        raise ConfigError(f"--disks must be from 1 to {MAX_DISKS}, got {disk_count}")
    if data_shards + parity_shards > disk_count:
        raise ConfigError(
            f"{data_shards} data + {parity_shards} parity shards need at least "
            f"{data_shards + parity_shards} disks (each shard of a block goes on its own "
            f"disk), but {disk_count} {'was' if disk_count == 1 else 'were'} given")


def _given_disks(disk_paths: Sequence[Path]) -> tuple[DiskSpec, ...]:
    disks = []
    seen: set[Path] = set()
    for number, given in enumerate(disk_paths):
        path = Path(given).expanduser().absolute()
        if not path.is_dir():
            raise ConfigError(f"disk path {path} is not an existing folder "
                              "(mount the disk first, or create the folder)")
        real = path.resolve()
        if real in seen:
            raise ConfigError(f"disk path {path} is given twice; every disk needs its own "
                              "folder")
        seen.add(real)
        disks.append(DiskSpec(f"disk{number}", path, require_mount=os.path.ismount(path)))
    return tuple(disks)


def init_home(
    home: Path,
    *,
    disks: int | None = None,
    data_shards: int = 4,
    parity_shards: int = 2,
    listen: str = DEFAULT_LISTEN,
    disk_paths: Sequence[Path] | None = None,
    small_block_limit: int = DEFAULT_SMALL_BLOCK_LIMIT,
    reserve_free_bytes: int = DEFAULT_RESERVE_FREE_BYTES,
) -> ApplianceConfig:
    """Create a new appliance home and return its config.

    `disks` folders are made under HOME/disks (default 6), unless `disk_paths` names existing
    folders or mount points to use instead (a mount point gets require_mount = true). Raises
    HomeExistsError for a home in use and ConfigError for impossible settings — before
    anything is written.
    """
    home = Path(home).expanduser().absolute()
    if disk_paths:
        if disks is not None and disks != len(disk_paths):
            raise ConfigError(f"--disks {disks} does not match the {len(disk_paths)} "
                              "--disk-path values given (leave --disks out)")
        disk_count = len(disk_paths)
    else:
        disk_count = DEFAULT_DISKS if disks is None else disks
    _check_shape(disk_count, data_shards, parity_shards)
    host, port = parse_listen(listen)
    if small_block_limit < 0 or reserve_free_bytes < 0:
        raise ConfigError("small_block_limit and reserve_free_bytes cannot be negative")
    check_home_is_free(home)
    specs = _given_disks(disk_paths) if disk_paths else tuple(
        DiskSpec(f"disk{i}", home / DISKS_DIR / f"disk{i}") for i in range(disk_count))

    config = ApplianceConfig(
        home=home,
        store=StoreSettings(
            appliance_id=str(uuid.uuid4()), disks=specs, data_shards=data_shards,
            parity_shards=parity_shards, small_block_limit=small_block_limit,
            reserve_free_bytes=reserve_free_bytes),
        listen_host=host,
        listen_port=port,
        tls_certificate=home / DEFAULT_TLS_CERTIFICATE,
        tls_key=home / DEFAULT_TLS_KEY,
        database=home / DEFAULT_DATABASE,
    )
    created_home = not home.exists()
    # Given disks may hold a lost+found; remember what was there so that a failed init
    # takes back only what it added (a marker left behind would tie the disk to an
    # appliance that was never made, and the next init would refuse it).
    before = {spec.path: _entries(spec.path) for spec in specs
              if not spec.path.is_relative_to(home)}
    try:
        home.mkdir(parents=True, exist_ok=True)
        _populate(config)
    except BaseException:
        for path, entries in before.items():
            _remove_all(path, keep=entries)
        _remove_all(home, keep=set())
        if created_home:
            shutil.rmtree(home, ignore_errors=True)
        raise
    return config


def _entries(folder: Path) -> set[str]:
    return {child.name for child in folder.iterdir()}


def _remove_all(folder: Path, keep: set[str]) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _populate(config: ApplianceConfig) -> None:
    for spec in config.store.disks:
        format_disk(spec, config.appliance_id)
    with contextlib.closing(open_database(config.database)):
        pass
    write_self_signed_certificate(config.tls_certificate, config.tls_key, config.listen_host)
    write_device_ca(config.home, make_device_ca(config.appliance_id))
    write_config(config)  # last: its presence says the home is complete
