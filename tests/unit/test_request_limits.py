"""The pure parts of the appliance's limits on clients: how long a request body may take
(appliance/api/bodylimit.py), when a request head is too large, and how many connections
an open-file limit allows (appliance/https.py). The integration side is
tests/integration/test_load_bad_clients.py."""

from __future__ import annotations

import resource
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from appliance.api.bodylimit import (
    BODY_GRACE_S,
    BODY_IDLE_TIMEOUT_S,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MIN_BODY_RATE,
    body_deadline,
    head_problem,
)
from appliance.https import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    connection_cap,
    open_file_target,
)


def test_a_body_that_stalls_gets_the_idle_timeout() -> None:
    # Fast so far: 4 MiB in 1 s would allow minutes of silence by rate; the idle timeout rules.
    assert body_deadline(0.0, 4 * 1024 * 1024, 1.0) == 1.0 + BODY_IDLE_TIMEOUT_S


def test_a_dribbled_body_is_cut_after_the_grace() -> None:
    # A byte a second: the rate deadline stays near started + grace.
    started = 100.0
    for second in range(1, 31):
        assert body_deadline(started, second, started + second) <= started + BODY_GRACE_S + 1
    # A body right at the minimum rate is never cut.
    assert body_deadline(0.0, int(MIN_BODY_RATE * 600), 600.0) > 600.0


@given(started=st.floats(0, 1e6), received=st.integers(0, 64 * 1024 * 1024),
       elapsed=st.floats(0, 1e4))
def test_the_deadline_is_never_past_the_idle_timeout_nor_before_now_in_the_grace(
        started: float, received: int, elapsed: float) -> None:
    now = started + elapsed
    deadline = body_deadline(started, received, now)
    assert deadline <= now + BODY_IDLE_TIMEOUT_S
    if elapsed < BODY_GRACE_S:
        assert deadline > now


def scope(path: str = "/me", query: bytes = b"",
          headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
    return {"type": "http", "path": path, "raw_path": path.encode(), "query_string": query,
            "headers": headers if headers is not None else [(b"host", b"cairn")]}


def test_head_limits() -> None:
    assert head_problem(scope()) is None
    assert head_problem(scope(headers=[(b"a", b"b")] * MAX_HEADERS)) is None
    assert "headers" in str(head_problem(scope(headers=[(b"a", b"b")] * (MAX_HEADERS + 1))))
    assert head_problem(scope("/" + "a" * (MAX_HEAD_BYTES - 100))) is None
    assert head_problem(scope("/" + "a" * MAX_HEAD_BYTES)) is not None
    assert head_problem(scope(query=b"q=" + b"a" * MAX_HEAD_BYTES)) is not None
    assert head_problem(scope(headers=[(b"x-big", b"a" * MAX_HEAD_BYTES)])) is not None


def test_connection_cap_follows_the_open_file_limit() -> None:
    assert connection_cap(1_000_000) == MAX_CONNECTIONS
    assert connection_cap(MAX_CONNECTIONS + FD_RESERVE) == MAX_CONNECTIONS
    assert connection_cap(1024) == 1024 - FD_RESERVE
    assert connection_cap(256) == 128          # half, when the reserve would leave too few
    assert connection_cap(1) == 1


def test_the_open_file_limit_is_raised_only_as_far_as_needed_and_allowed() -> None:
    needed = MAX_CONNECTIONS + FD_RESERVE
    assert open_file_target(1024, 1_048_576) == needed
    assert open_file_target(1024, resource.RLIM_INFINITY) == needed
    assert open_file_target(1024, 2000) == 2000
    assert open_file_target(1024, 1024) == 1024
    assert open_file_target(65536, 1_048_576) == 65536   # never lowered
