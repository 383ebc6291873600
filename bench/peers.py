#!/usr/bin/env python3
"""Benchmark of LAN peers (issue 15): device B fetches a file device A already has, from the
appliance alone and with A as a peer, on a LAN whose appliance link is shaped to 100 Mbit/s.

The setup is the Show test's own (tests/lan_helpers.py, `three_hosts` and `fetch_scenario`,
imported from there so that the figures here are the test's): three network namespaces on
one bridge in a namespace of their own — the appliance (`cairnd serve` on 10.79.0.1, six
disk folders, 4+2), device A and device B — with a tbf of --rate on both directions of the
appliance's link, added after A's upload. Then:

- the link's real rate: one plain TCP stream of 32 MiB from the appliance's host to B's,
  and B's `cairn get --no-peers` of a 64 MiB file;
- B's `cairn get --no-peers` and `cairn get` of the --size-gib file (seconds, MB/s, the
  ratio), each in a fresh B home;
- B's `cairn sync DIR --no-peers` and `cairn sync DIR` of A's folder, until the file is in
  DIR (seconds, the ratio), each in a fresh B home;
- in each run: the blocks the appliance served (its own counters, `cairnd stats --json`
  before and after), the CPU seconds of B's agent (wait4 for get, /proc for sync) and of
  A's running `cairn sync` over the same span, per GiB, and the peak RSS of both.

Every copy is checked byte-exact (BLAKE3). Needs root (network namespaces, tc). Everything
is made in a fresh folder under bench/out/ and deleted; the namespaces and every process
started are gone at the end, whatever happened.

    .venv/bin/python bench/peers.py [--size-gib 1] [--rate 100mbit]

See docs/benchmarks.md ("LAN peers") for the figures measured on the project's machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import Figure, format_table, free_bytes, machine_info, say

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from lan_helpers import (  # noqa: E402 — the Show test's LAN, on purpose (module doc)
    RUNS,
    LanError,
    Scenario,
    fetch_scenario,
    three_hosts,
)

GIB = 1 << 30
TARGET_SPEEDUP = 3.0          # the issue's: with peers at least 3x faster
TARGET_SERVED_SHARE = 0.10    # of the file's blocks served by the appliance with peers


def figures(shown: Scenario) -> list[Figure]:
    """The table: the link, each run's time and speed, the ratios, the blocks the appliance
    served, and the agents' CPU and memory."""
    gib = shown.size / GIB
    link_mbs = shown.tcp_bytes_per_s / 1e6
    runs = shown.runs
    out = [Figure("link: one TCP stream, appliance -> B", link_mbs, "MB/s",
                  note=f"{link_mbs * 8:.0f} Mbit/s (tbf {shown.rate} both ways)"),
           Figure("link: cairn get --no-peers of 64 MiB", shown.link_bytes_per_s / 1e6, "MB/s",
                  link_mbs, "MB/s link",
                  note=f"{shown.probe_seconds:.2f} s, the agent's start included")]
    for kind in ("get", "sync"):
        alone, peers = runs[f"{kind} alone"], runs[f"{kind} peers"]
        out += [
            Figure(f"{kind} without peers", alone.seconds, "s"),
            Figure(f"{kind} without peers, speed", shown.size / alone.seconds / 1e6, "MB/s",
                   link_mbs, "MB/s link"),
            Figure(f"{kind} with peers", peers.seconds, "s"),
            Figure(f"{kind} with peers, speed", shown.size / peers.seconds / 1e6, "MB/s",
                   link_mbs, "MB/s link"),
            Figure(f"{kind}: without / with peers", shown.speedup(kind), "x",
                   target=TARGET_SPEEDUP),
        ]
    for label in RUNS:
        run = runs[label]
        with_peers = label.endswith("peers")
        out.append(Figure(
            f"{label}: blocks the appliance served", run.served_blocks, "blocks",
            shown.blocks, "blocks in the file",
            target=TARGET_SERVED_SHARE if with_peers else None, at_most=True,
            note=f"{run.served_bytes / 1e6:.0f} MB"))
    for label in RUNS:
        run = runs[label]
        out += [Figure(f"{label}: B's agent CPU per GiB", run.b_cpu_seconds / gib, "CPU-s"),
                Figure(f"{label}: A's agent CPU per GiB", run.a_cpu_seconds / gib, "CPU-s"),
                Figure(f"{label}: B's agent peak RSS", run.b_peak_rss_mib, "MiB")]
    out.append(Figure("A's agent peak RSS (cairn sync, whole run)", shown.a_peak_rss_mib,
                      "MiB"))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=1.0,
                        help="size of the file A has and B fetches, in GiB (default 1)")
    parser.add_argument("--rate", default="100mbit",
                        help="the appliance's link, as tc's tbf rate (default 100mbit)")
    parser.add_argument("--dir", type=Path, default=BENCH / "out",
                        help="parent folder of the run's fresh folder (default bench/out)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds any one agent command may take (default 1800)")
    parser.add_argument("--json", type=Path, default=BENCH / "out" / "peers.json",
                        help="also write the results here (default bench/out/peers.json)")
    args = parser.parse_args(argv)
    if args.size_gib * GIB < 64 << 20:
        parser.error("--size-gib must be at least 1/16 (64 MiB)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = int(args.size_gib * GIB)
    args.dir.mkdir(parents=True, exist_ok=True)
    need = int(size * 3.5)   # A's file, its shards (x1.5), one copy of B's at a time, slack
    free = free_bytes(args.dir)
    if free < need:
        say(f"refusing to run: {args.dir} has {free / 1e9:.1f} GB free, the run needs "
            f"{need / 1e9:.1f} GB")
        return 2
    run_dir = Path(tempfile.mkdtemp(prefix="peers-", dir=args.dir)).resolve()
    info = machine_info(run_dir)
    fs = info.get("filesystem", {})
    say(f"machine: {info.get('nproc')} CPUs, {info.get('memory_gib')} GiB, "
        f"{fs.get('type', '?')} on {fs.get('device', '?')}; run folder {run_dir}")
    started = time.monotonic()
    try:
        with three_hosts(run_dir / "lan") as net:
            shown = fetch_scenario(net, run_dir, size, rate=args.rate,
                                   note=lambda text: say(f"  {text}"), timeout=args.timeout)
    except LanError as error:
        say(f"bench failed: {error}")
        return 2
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    table = figures(shown)
    say("")
    say(format_table(table))
    say("")
    for f in table:
        if f.note:
            say(f"  {f.name}: {f.note}")
    say(f"  total {time.monotonic() - started:.0f} s")
    payload: dict[str, Any] = {
        "machine": info,
        "settings": {"size_gib": args.size_gib, "rate": args.rate, "disks": 6,
                     "data_shards": 4, "parity_shards": 2},
        "figures": [f.to_json() for f in table],
        "runs": {label: asdict(run) for label, run in shown.runs.items()},
        "upload_seconds": round(shown.upload_seconds, 2),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if any(f.verdict == "MISS" for f in table) else 0


if __name__ == "__main__":
    sys.exit(main())
