"""The agent's home: this device's credentials, the user's keys, pinned public keys.

    HOME/                 0700; `--home`, else $CAIRN_HOME, else ~/.cairn
        device.json       0600  appliance id, url, certificate, device id and token, user
        keys              0600  the user's keys (root key, content secret, X25519 private)
        peers.json        0600  other users' public keys, pinned on first use
        device-key.pem    0600  this device's Ed25519 key for LAN peers (agent/peers/identity.py)
        device-cert.pem   0600  its certificate, signed by the appliance's device CA (24 h)
        device-ca.pem     0600  the device CA, pinned at the first certificate
        config.toml             the agent's own settings, optional ([peers]: agent/peers/config.py)

Every file is written whole to a temporary name, fsynced and renamed, so a crash leaves the
old version or the new one, never half of each. Secrets are 0600 like ~/.ssh keys: the
device is the user's, and the keys never leave it except inside the passphrase-sealed bundle.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from agent.crypto.keys import UserKeys
from agent.errors import KeyPinError, LocalFileError, NotEnrolledError

HOME_ENV = "CAIRN_HOME"
DEVICE_FILE = "device.json"
KEYS_FILE = "keys"
PEERS_FILE = "peers.json"


@dataclass(frozen=True)
class DeviceRecord:
    """What joining produced: where the appliance is and who we are to it."""

    appliance_id: str
    url: str
    fingerprint: str          # SHA-256 of the certificate's DER, hex
    certificate: str          # PEM, pinned
    device_id: str
    device_name: str
    user: str
    token: str

    def with_url(self, url: str) -> DeviceRecord:
        return replace(self, url=url)


def default_home() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env) if env else Path.home() / ".cairn"


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace PATH with DATA, readable by the owner only."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AgentHome:
    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(f"cannot create the agent home {self.path}: "
                                 f"{exc.strerror}") from None

    # --- device -----------------------------------------------------------------------

    def is_enrolled(self) -> bool:
        return (self.path / DEVICE_FILE).exists() and (self.path / KEYS_FILE).exists()

    def load_device(self) -> DeviceRecord:
        try:
            data = json.loads((self.path / DEVICE_FILE).read_text(encoding="utf-8"))
            return DeviceRecord(**data)
        except FileNotFoundError:
            raise NotEnrolledError(
                f"this device has not joined an appliance (no {self.path / DEVICE_FILE}); "
                "run `cairn join CODE` with a code from `cairnd user add`") from None
        except (ValueError, TypeError) as exc:
            raise LocalFileError(f"{self.path / DEVICE_FILE} is damaged ({exc}); "
                                 "join again with a new code") from None

    def save_device(self, device: DeviceRecord) -> None:
        self.ensure()
        write_private(self.path / DEVICE_FILE,
                      (json.dumps(asdict(device), indent=2) + "\n").encode())

    # --- keys -------------------------------------------------------------------------

    def load_keys(self) -> UserKeys:
        try:
            return UserKeys.from_bytes((self.path / KEYS_FILE).read_bytes())
        except FileNotFoundError:
            # Joined but without keys (a wrong passphrase): join again is refused, so say
            # what works.
            remedy = ("run `cairn unlock` with your passphrase"
                      if (self.path / DEVICE_FILE).exists()
                      else "run `cairn join CODE` to finish joining")
            raise NotEnrolledError(f"this device has no keys ({self.path / KEYS_FILE}); "
                                   f"{remedy}") from None

    def save_keys(self, keys: UserKeys) -> None:
        self.ensure()
        write_private(self.path / KEYS_FILE, keys.to_bytes())

    # --- other users' public keys, pinned on first use ------------------------------

    def _peers(self) -> dict[str, str]:
        try:
            data: Any = json.loads((self.path / PEERS_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError:
            raise LocalFileError(f"{self.path / PEERS_FILE} is damaged") from None
        return {str(k): str(v) for k, v in data.items()}

    def pin_public_key(self, user: str, public_key: bytes) -> bytes:
        """USER's public key, pinned: the first key seen is kept, and a different one later
        is refused loudly (someone — the appliance, or whoever controls it — swapped it)."""
        peers = self._peers()
        seen = base64.b64encode(public_key).decode()
        pinned = peers.get(user)
        if pinned is None:
            peers[user] = seen
            self.ensure()
            write_private(self.path / PEERS_FILE,
                          (json.dumps(peers, indent=2, sort_keys=True) + "\n").encode())
            return public_key
        if pinned != seen:
            raise KeyPinError(
                f"the public key of user {user!r} changed since this device first saw it "
                f"(pinned {pinned[:12]}…, now {seen[:12]}…): refusing to use it. If {user} "
                f"really made new keys, remove their entry from {self.path / PEERS_FILE}")
        return public_key

    def pinned_public_key(self, user: str) -> bytes | None:
        pinned = self._peers().get(user)
        return None if pinned is None else base64.b64decode(pinned)
