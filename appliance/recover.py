"""`cairnd recover`: rebuild a lost appliance home from the copies on its data disks.

The disks say who they are (their marker: appliance id and slot name) and hold the copies
of the home that a serving appliance keeps (appliance/home_copies.py). Recovery:

1. reads the marker of every disk given, which must all belong to one appliance;
2. picks the newest copy whose files match its manifest (a copy a failing disk damaged is
   skipped, and the next newest used);
3. writes a new home: the database, the TLS key pair (same certificate, so agents keep
   their pins), the secrets, and a config whose disk paths are the paths given (matched
   by slot name, so they may be given in any order or mounted elsewhere now) — config.toml
   last, as `cairnd init` does;
4. gives the database a new epoch (appliance/meta/epoch.py): devices that saw later
   changes than the copy holds notice, and send them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from appliance.config import (
    CONFIG_NAME,
    DEFAULT_DATABASE,
    ApplianceConfig,
    load_config,
    write_config,
)
from appliance.db import open_database
from appliance.errors import RecoverError
from appliance.home import check_home_is_free
from appliance.home_copies import (
    CERTIFICATE_NAME,
    DATABASE_NAME,
    KEY_NAME,
    SECRETS_DIR,
    copies_on,
    copy_file,
    read_manifest,
    verify_copy,
)
from appliance.meta import epoch
from appliance.storage.disk import MARKER_NAME

TLS_DIR = "tls"


@dataclass(frozen=True)
class Recovered:
    config: ApplianceConfig
    copy: Path
    sequence: int
    written_at: float
    clean_stop: bool
    skipped: list[str]          # copies passed over, with why
    missing_slots: list[str]    # slots of the config that no given disk filled
    epoch: str


def _marker(path: Path) -> dict[str, object]:
    try:
        data = json.loads((path / MARKER_NAME).read_bytes())
    except FileNotFoundError:
        raise RecoverError(f"{path} is not a Cairn disk (no {MARKER_NAME})") from None
    except (OSError, ValueError) as exc:
        raise RecoverError(f"cannot read the marker of {path}: {exc}") from None
    if not isinstance(data, dict) or not data.get("appliance_id") or not data.get("slot"):
        raise RecoverError(f"{path}/{MARKER_NAME} is damaged")
    return data


def identify_disks(disk_paths: Sequence[Path]) -> tuple[str, dict[str, Path]]:
    """The appliance id the disks belong to, and their paths by slot name."""
    if not disk_paths:
        raise RecoverError("give the appliance's disks with --disk-path (one per disk)")
    slots: dict[str, Path] = {}
    owners: dict[str, list[Path]] = {}
    for given in disk_paths:
        path = Path(given).expanduser().absolute()
        if not path.is_dir():
            raise RecoverError(f"disk path {path} is not a folder (mount the disk first)")
        marker = _marker(path)
        slot = str(marker["slot"])
        if slot in slots:
            raise RecoverError(f"{slots[slot]} and {path} both claim slot {slot}")
        slots[slot] = path
        owners.setdefault(str(marker["appliance_id"]), []).append(path)
    if len(owners) > 1:
        listing = "; ".join(f"{owner}: {', '.join(map(str, paths))}"
                            for owner, paths in owners.items())
        raise RecoverError(f"the disks belong to different appliances ({listing}); give the "
                           "disks of one appliance")
    return next(iter(owners)), slots


def newest_copy(appliance_id: str, disks: Sequence[Path]) -> tuple[Path, dict[str, object],
                                                                  list[str]]:
    """The newest intact copy of the home on DISKS, its manifest, and the copies skipped."""
    candidates = sorted(((seq, copy) for disk in disks for seq, copy in copies_on(disk)),
                        reverse=True)
    skipped: list[str] = []
    for _, copy in candidates:
        manifest = read_manifest(copy)
        problem = verify_copy(copy)
        if problem is None and manifest is not None \
                and manifest.get("appliance_id") != appliance_id:
            problem = "copy of another appliance"
        if problem is None and manifest is not None:
            return copy, manifest, skipped
        skipped.append(f"{copy}: {problem}")
    where = ", ".join(map(str, disks))
    detail = f" ({'; '.join(skipped)})" if skipped else ""
    raise RecoverError(f"no intact copy of the home on {where}{detail}; copies are made "
                       "while `cairnd serve` runs")


def recover_home(home: Path, disk_paths: Sequence[Path]) -> Recovered:
    """Build a complete home in HOME (absent or empty) from the disks' newest copy."""
    home = Path(home).expanduser().absolute()
    check_home_is_free(home)
    appliance_id, slots = identify_disks(disk_paths)
    copy, manifest, skipped = newest_copy(appliance_id, list(slots.values()))
    created = not home.exists()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        config, missing = _place_files(home, copy, slots)
        with contextlib.closing(open_database(config.database)) as db, db:
            new_epoch = epoch.renew_epoch(db)
        write_config(config)   # last: its presence says the home is complete
    except BaseException:
        for child in list(home.iterdir()) if home.exists() else []:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        if created:
            shutil.rmtree(home, ignore_errors=True)
        raise
    return Recovered(config, copy, int(str(manifest["sequence"])),
                     float(str(manifest["written_at"])), bool(manifest.get("clean_stop")),
                     skipped, missing, new_epoch)


def _place_files(home: Path, copy: Path, slots: dict[str, Path]
                 ) -> tuple[ApplianceConfig, list[str]]:
    """Copy the copy's files into HOME and make the config that fits them. The copy's
    config is read from a scratch folder, so that its relative paths resolve as usual."""
    scratch = home / ".recover-config"
    scratch.mkdir(mode=0o700)
    try:
        shutil.copyfile(copy / CONFIG_NAME, scratch / CONFIG_NAME)
        old = load_config(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for folder in (TLS_DIR, SECRETS_DIR):
        (home / folder).mkdir(mode=0o700, exist_ok=True)
    placed = {DATABASE_NAME: home / DEFAULT_DATABASE, CERTIFICATE_NAME: home / CERTIFICATE_NAME,
              KEY_NAME: home / KEY_NAME}
    for entry in (copy / SECRETS_DIR).glob("*"):
        placed[f"{SECRETS_DIR}/{entry.name}"] = home / SECRETS_DIR / entry.name
    for name, target in placed.items():
        copy_file(copy / name, target, (copy / name).stat().st_mode & 0o777)
    def moved(path: Path) -> Path:   # a path the old config gave relative to its home
        return home / path.relative_to(scratch) if path.is_relative_to(scratch) else path

    disks = tuple(
        replace(spec, path=slots[spec.name], require_mount=os.path.ismount(slots[spec.name]))
        if spec.name in slots else replace(spec, path=moved(spec.path))
        for spec in old.store.disks)
    missing = [spec.name for spec in old.store.disks if spec.name not in slots]
    config = replace(old, home=home, store=replace(old.store, disks=disks),
                     database=home / DEFAULT_DATABASE, tls_certificate=home / CERTIFICATE_NAME,
                     tls_key=home / KEY_NAME)
    return config, missing


def age_text(written_at: float, now: float | None = None) -> str:
    seconds = max(0.0, (time.time() if now is None else now) - written_at)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
