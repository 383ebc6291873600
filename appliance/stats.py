"""What the serving appliance has done since it started, counted in memory: blocks and bytes
it served (GET /blocks/{id}, POST /blocks/read), and the LAN-peer work it signed for
(certificates, grants, admissions).

The counters live in the `cairnd serve` process only; `cairnd stats` reads them through the
admin socket (appliance/admin.py) and says so plainly when no appliance serves. With LAN
peers the appliance should serve a small part of what devices download: these counters are
how a test or an operator sees that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from appliance.admin import AdminRequest, Handler


@dataclass
class ServedCounters:
    """Counts since start. Updated on the event loop only (no lock needed)."""

    started_at: float = field(default_factory=time.time)
    blocks_served: int = 0          # GET /blocks/{id} answers (a ranged one counts once)
    bytes_served: int = 0
    batch_blocks_served: int = 0    # blocks sent inline by POST /blocks/read
    batch_bytes_served: int = 0
    certificates_signed: int = 0
    grants_issued: int = 0
    devices_admitted: int = 0

    def served_block(self, size: int) -> None:
        self.blocks_served += 1
        self.bytes_served += size

    def served_batch(self, sizes: list[int]) -> None:
        self.batch_blocks_served += len(sizes)
        self.batch_bytes_served += sum(sizes)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "started_at": self.started_at,
            "uptime_s": round(now - self.started_at, 3),
            "blocks_served": self.blocks_served + self.batch_blocks_served,
            "bytes_served": self.bytes_served + self.batch_bytes_served,
            "url_blocks_served": self.blocks_served,
            "url_bytes_served": self.bytes_served,
            "batch_blocks_served": self.batch_blocks_served,
            "batch_bytes_served": self.batch_bytes_served,
            "certificates_signed": self.certificates_signed,
            "grants_issued": self.grants_issued,
            "devices_admitted": self.devices_admitted,
        }


def stats_handler(counters: ServedCounters) -> Handler:
    """The admin socket's `stats` command: a snapshot of COUNTERS."""
    async def handle(request: AdminRequest) -> dict[str, Any]:
        return counters.to_json()
    return handle


def _mb(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def render_stats(stats: dict[str, Any]) -> str:
    """The `cairnd stats` text, from `ServedCounters.to_json()`."""
    uptime = float(stats["uptime_s"])
    return "\n".join([
        f"serving for {uptime:.0f} s",
        f"blocks served:       {stats['blocks_served']} ({_mb(stats['bytes_served'])}); "
        f"from URLs {stats['url_blocks_served']} ({_mb(stats['url_bytes_served'])}), "
        f"in batches {stats['batch_blocks_served']} ({_mb(stats['batch_bytes_served'])})",
        f"device certificates: {stats['certificates_signed']} signed",
        f"block grants:        {stats['grants_issued']} issued",
        f"LAN admissions:      {stats['devices_admitted']}",
    ])
