"""The API's version: `MAJOR.MINOR`. A minor version only adds (routes, optional fields); a
new major version breaks clients of the old one.

The appliance sends it in the `Cairn-Api-Version` header of every answer (and in /health,
the enrollment proof and its mDNS record). The agent checks it on its first answer: another
major version stops it with one clear line instead of a validation error later.
"""

from __future__ import annotations

API_VERSION = "1.5"
HEADER = "Cairn-Api-Version"

INLINE_BATCH_BLOCKS = "1.1"
"""Since this version POST /batch/files takes small blocks inline (`blocks`)."""

STORED_BLOCK_URLS = "1.2"
"""Since this version GET /files/{id}/presigned-url?stored_only=true answers, for a file
still uploading, download URLs of the blocks stored so far: another device can fetch a big
file while it is being uploaded."""

EPOCH = "1.3"
"""Since this version GET /me and GET /changes report the database's epoch (`epoch`; /me
also `epoch_started_at`): a new one after the appliance was recovered from an older copy
of its database, so devices re-send what the copy lacks (docs/sync.md)."""

EPOCH_CURSOR = "1.4"
"""Since this version GET /me also reports `epoch_started_cursor`, the newest change cursor
when the epoch began: a device re-basing after a recovery reads the feed after it to learn
which version of each node changed since the copy had (agent/sync/rollback.py)."""


class IncompatibleApiError(ValueError):
    """The other side speaks another major version of the API (or no version at all)."""


def major_of(version: str) -> int:
    """The major version of VERSION (`"1.0"` → 1; `"1"`, as appliances before 1.0 said, → 1).
    Raises IncompatibleApiError for text that is not a version."""
    head = version.strip().split(".", 1)[0]
    if not head.isdigit():
        raise IncompatibleApiError(f"{version!r} is not an API version")
    return int(head)


def _parts(version: str) -> tuple[int, int]:
    major = major_of(version)
    tail = version.strip().split(".", 1)[1:] or ["0"]
    minor = tail[0].split(".", 1)[0]
    return major, int(minor) if minor.isdigit() else 0


def supports(theirs: str, since: str) -> bool:
    """Whether an appliance of version THEIRS has what came in version SINCE (the same
    major version, at least that minor one)."""
    (major, minor), (need_major, need_minor) = _parts(theirs), _parts(since)
    return major == need_major and minor >= need_minor


def check_compatible(theirs: str, ours: str = API_VERSION) -> None:
    """Raise IncompatibleApiError unless THEIRS has OURS's major version."""
    if major_of(theirs) != major_of(ours):
        newer = major_of(theirs) > major_of(ours)
        raise IncompatibleApiError(
            f"the appliance speaks API version {theirs} and this agent {ours}: "
            + ("update this agent" if newer else "update the appliance"))

PEERS = "1.5"
"""Since this version the appliance signs device certificates (POST /devices/me/
certificate), lists revoked devices (GET /devices/revoked, and an `event: revoked` on
/events), adds block grants to download URLs (`peer_grants`) and admits a device another
device of the same user approved on the LAN (POST /devices/admit)."""
