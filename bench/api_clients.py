"""Client side of block transfers, for the agent's choice of HTTP client: httpx.AsyncClient
under trio against httpx.Client (stdlib ssl sockets) driven from worker threads with
trio.to_thread.run_sync, for PUT and GET of 4 MiB blocks to pre-signed URLs, N in flight.

Used by bench/api.py (`--compare-clients`). Each run uploads a fresh file of distinct
blocks (so every PUT is stored, not deduplicated), then downloads it with the same client
kind, checking every block. CPU is this process's own, which runs only the client.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from blockstore import BLOCK_SIZE, Blocks
from harness import own_cpu_seconds

KINDS = ("async", "threads")
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClientRun:
    kind: str            # "async" (httpx.AsyncClient) or "threads" (httpx.Client each)
    method: str          # "PUT" or "GET"
    in_flight: int
    blocks: int
    seconds: float
    cpu_s: float         # this process's CPU (user + system) during the run

    @property
    def mb_s(self) -> float:
        return self.blocks * BLOCK_SIZE / self.seconds / 1e6

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / max(self.blocks * BLOCK_SIZE / 1e9, 1e-9)

    def to_json(self) -> dict[str, Any]:
        return {"client": self.kind, "method": self.method, "in_flight": self.in_flight,
                "blocks": self.blocks, "seconds": round(self.seconds, 3),
                "mb_s": round(self.mb_s, 1), "client_cpu_s_per_gb": round(self.cpu_s_per_gb, 2)}


async def _run_workers(count: int, in_flight: int, deadline: float,
                       one: Callable[[int, int], Awaitable[None]]) -> int:
    """one(worker, index) for index 0..count-1, `in_flight` workers; returns how many ran
    before the deadline (trio.current_time)."""
    next_index = done = 0

    async def worker(number: int) -> None:
        nonlocal next_index, done
        while next_index < count and trio.current_time() < deadline:
            index, next_index = next_index, next_index + 1
            await one(number, index)
            done += 1

    async with trio.open_nursery() as nursery:
        for number in range(in_flight):
            nursery.start_soon(worker, number)
    return done


class Transfer:
    """PUTs or GETs of `blocks` to `urls` (relative, in block order) with one client kind."""

    def __init__(self, base_url: str, verify: ssl.SSLContext, blocks: Blocks,
                 timeout_s: float) -> None:
        self.base_url = base_url
        self.verify = verify
        self.blocks = blocks
        self.timeout_s = timeout_s

    def run(self, kind: str, method: str, urls: list[str], in_flight: int) -> ClientRun:
        runner = self._run_async if kind == "async" else self._run_threads
        return trio.run(runner, method, urls, in_flight)

    def _check(self, method: str, index: int, response: httpx.Response) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"{method} block {index}: HTTP {response.status_code} "
                               f"{response.text[:300]}")
        if method == "GET":
            self.blocks.check(index, response.content)

    async def _run_async(self, method: str, urls: list[str], in_flight: int) -> ClientRun:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        async with httpx.AsyncClient(base_url=self.base_url, verify=self.verify,
                                     limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
            async with trio.open_nursery() as nursery:  # open every connection first
                for _ in range(in_flight):
                    nursery.start_soon(client.get, "/health")

            async def one(_: int, index: int) -> None:
                if method == "PUT":
                    response = await client.put(urls[index], content=self.blocks.make(index),
                                                headers={"Content-Type":
                                                         "application/octet-stream"})
                else:
                    response = await client.get(urls[index])
                self._check(method, index, response)

            return await self._timed("async", method, urls, in_flight, one)

    async def _run_threads(self, method: str, urls: list[str], in_flight: int) -> ClientRun:
        clients = [httpx.Client(base_url=self.base_url, verify=self.verify,
                                timeout=REQUEST_TIMEOUT_S) for _ in range(in_flight)]
        limiter = trio.CapacityLimiter(in_flight)
        try:
            for client in clients:
                client.get("/health")

            def blocking(worker: int, index: int) -> None:
                client = clients[worker]
                if method == "PUT":
                    response = client.put(urls[index], content=self.blocks.make(index),
                                          headers={"Content-Type": "application/octet-stream"})
                else:
                    response = client.get(urls[index])
                self._check(method, index, response)

            async def one(worker: int, index: int) -> None:
                await trio.to_thread.run_sync(blocking, worker, index, limiter=limiter)

            return await self._timed("threads", method, urls, in_flight, one)
        finally:
            for client in clients:
                client.close()

    async def _timed(self, kind: str, method: str, urls: list[str], in_flight: int,
                     one: Callable[[int, int], Awaitable[None]]) -> ClientRun:
        cpu, started = own_cpu_seconds(), time.perf_counter()
        done = await _run_workers(len(urls), in_flight, trio.current_time() + self.timeout_s,
                                  one)
        return ClientRun(kind, method, in_flight, done, time.perf_counter() - started,
                         own_cpu_seconds() - cpu)


def format_runs(runs: list[ClientRun]) -> str:
    lines = ["client                         method  in flight  MB/s   client CPU s/GB",
             "-----------------------------  ------  ---------  -----  ---------------"]
    names = {"async": "httpx.AsyncClient (trio)", "threads": "httpx.Client x N (threads)"}
    for run in runs:
        lines.append(f"{names[run.kind]:<29}  {run.method:<6}  {run.in_flight:>9}  "
                     f"{run.mb_s:>5.0f}  {run.cpu_s_per_gb:>15.1f}")
    return "\n".join(lines)
