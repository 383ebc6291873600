"""Asking one LAN peer for blocks: HAVE (which of these do you hold?) and BLOCK (send one),
over mutual TLS with this device's certificate (blocking: call from worker threads).

Like the appliance's block path (agent/client.py), a peer's bodies go through httpcore's
blocking pool over `BulkTLSBackend`: the stdlib decrypts in C with the GIL released, and
the worker that fetches a block also verifies, decrypts and writes it. One pool per peer,
at most `max_connections` connections (the fetch policy never has more in flight).

Who the peer is shows only after the handshake, from its certificate: TLS already checked
that the pinned device CA signed it; `PeerClient` then checks, before sending a byte of a
request on that connection, that it is a device of **our appliance and our user**, **not
this device**, and **not revoked**. A peer failing that is refused for good (`untrusted`):
the request never leaves, so another user's device never even learns which blocks we want.
(The peer in turn checks our certificate and a grant for each block; protocol/peers.py.)

Timeouts are short (PEER_TIMEOUTS): on a LAN a connection is made in milliseconds and a
block read in well under a second, so a peer silent for a few seconds is given up and its
block fetched elsewhere ("nothing waits on a peer that went silent"). Failures are raised
as PeerFetchError with the agent.peers.fetch.Failure the policy acts on.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import httpcore

from agent.bulk_tls import BulkTLSBackend
from agent.client import _read_into
from agent.errors import CairnAgentError, IntegrityError, PeerError, PeerFetchError
from agent.peers.fetch import Failure
from agent.peers.identity import CertifiedDevice, PeerIdentity, certified_device
from protocol.peers import (
    PEER_BLOCK_PATH,
    PEER_HAVE_MAX_IDS,
    PEER_HAVE_PATH,
    DiscoveredPeer,
    GrantError,
    PeerBlockRequest,
    PeerHaveRequest,
    PeerHaveResult,
    verify_grant,
)

log = logging.getLogger("cairn.peers")

CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 3.0
PEER_TIMEOUTS = {"connect": CONNECT_TIMEOUT_S, "read": READ_TIMEOUT_S,
                 "write": READ_TIMEOUT_S, "pool": READ_TIMEOUT_S}
HAVE_MAX_GRANTS = 16            # PeerHaveRequest.grants' own limit
GRANT_MARGIN_S = 30.0           # a grant this close to expiring is not sent
_JSON = [(b"Content-Type", b"application/json")]


def index_grants(tokens: Iterable[str], identity: PeerIdentity, now: float
                 ) -> tuple[dict[str, str], float]:
    """Block id -> the grant token that covers it, from the grants the appliance issued
    with a node's URLs, and when the first of those grants expires (infinity: none).
    A token that does not verify against the pinned device CA, is not ours, or expires
    within GRANT_MARGIN_S is left out (those blocks come from the appliance): a peer
    would refuse it, and a refusal drops the peer."""
    key = identity.ca_public_key()
    me = identity.me
    covering: dict[str, str] = {}
    first_expiry = float("inf")
    for token in tokens:
        try:
            grant = verify_grant(token, key, now + GRANT_MARGIN_S)
        except GrantError as exc:
            log.debug("a block grant not used: %s", exc)
            continue
        if (grant.device_id, grant.key_sha256, grant.appliance_id) != (
                me.device_id, me.key_sha256, me.appliance_id):
            log.debug("a block grant for another device not used")
            continue
        first_expiry = min(first_expiry, grant.expires_at)
        for block in grant.blocks:
            covering.setdefault(block, token)
    return covering, first_expiry


def have_batches(ids: Sequence[str], grant_of: Mapping[str, str]
                 ) -> list[tuple[list[str], list[str]]]:
    """IDS (those a grant covers) cut into HAVE requests: (grants, ids) with at most
    PEER_HAVE_MAX_IDS ids and HAVE_MAX_GRANTS grants each."""
    batches: list[tuple[list[str], list[str]]] = []
    grants: dict[str, None] = {}
    batch: list[str] = []
    for block in dict.fromkeys(ids):
        token = grant_of.get(block)
        if token is None:
            continue
        if len(batch) >= PEER_HAVE_MAX_IDS or (
                token not in grants and len(grants) >= HAVE_MAX_GRANTS):
            batches.append((list(grants), batch))
            grants, batch = {}, []
        grants.setdefault(token, None)
        batch.append(block)
    if batch:
        batches.append((list(grants), batch))
    return batches


def is_trusted(device: CertifiedDevice, me: CertifiedDevice,
               revoked: Callable[[str], bool]) -> str | None:
    """Why DEVICE (a peer's certificate, already verified by TLS) must not be asked for
    our blocks, or None if it may."""
    if device.appliance_id != me.appliance_id:
        return "a device of another appliance"
    if device.user_tag != me.user_tag:
        return "a device of another user"
    if device.device_id == me.device_id:
        return "this device itself"
    if revoked(device.device_id):
        return "a revoked device"
    return None


class _Untrusted(Exception):
    """The peer's certificate is not one we ask for blocks (raised inside httpcore's
    connect, so no request is sent on that connection)."""


class _CheckedStream(httpcore.NetworkStream):
    """A plain TCP stream whose start_tls checks the peer's certificate once the
    handshake is done (everything else is the wrapped stream's)."""

    def __init__(self, inner: httpcore.NetworkStream,
                 check: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._check = check

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, timeout)
        ssl_object = tls.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            if not der:
                raise _Untrusted("the peer presented no certificate")
            self._check(der)
        except BaseException:
            tls.close()
            raise
        return tls


class _CheckedBackend(BulkTLSBackend):
    def __init__(self, check: Callable[[bytes], None]) -> None:
        super().__init__()
        self._check = check

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _CheckedStream(super().connect_tcp(host, port, timeout, local_address,
                                                  socket_options), self._check)


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


class PeerClient:
    """One discovered peer, asked over a pool of mutual-TLS connections. `name` is its
    device id once a handshake showed it (before: its record's instance id)."""

    def __init__(self, peer: DiscoveredPeer, identity: PeerIdentity, *,
                 revoked: Callable[[str], bool] = lambda device_id: False,
                 max_connections: int = 4) -> None:
        self.peer = peer
        self.identity = identity
        self.revoked = revoked
        self.device: CertifiedDevice | None = None
        self._lock = threading.Lock()
        self._address = 0        # index into peer.addresses of the one that answers
        self._pool = httpcore.ConnectionPool(
            ssl_context=identity.client_context(), max_connections=max_connections,
            keepalive_expiry=30.0, network_backend=_CheckedBackend(self._check))

    @property
    def name(self) -> str:
        device = self.device
        return device.device_id if device is not None else f"peer {self.peer.instance_id}"

    def close(self) -> None:
        self._pool.close()

    def _check(self, der: bytes) -> None:
        try:
            device = certified_device(der)
        except PeerError as exc:
            raise _Untrusted(exc.message) from None
        why = is_trusted(device, self.identity.me, self.revoked)
        if why is not None:
            raise _Untrusted(f"{why} ({device.device_id})")
        with self._lock:
            if self.device is not None and self.device.device_id != device.device_id:
                raise _Untrusted(f"another device ({device.device_id}) than before "
                                 f"({self.device.device_id}) answers at this address")
            self.device = device

    # --- the two requests ------------------------------------------------------------

    def have(self, ids: Sequence[str], grant_of: Mapping[str, str]) -> set[str]:
        """Which of IDS the peer holds (only those a grant in GRANT_OF covers are asked;
        batched). Raises PeerFetchError."""
        held: set[str] = set()
        for grants, batch in have_batches(ids, grant_of):
            body = PeerHaveRequest(grants=grants, ids=batch).model_dump_json().encode()
            answer = self._post(PEER_HAVE_PATH, body)
            try:
                result = PeerHaveResult.model_validate_json(bytes(answer))
            except ValueError:
                raise PeerFetchError(f"{self.name} answered HAVE with something else",
                                     Failure.ERROR.value) from None
            asked = set(batch)
            held.update(block for block in result.have if block in asked)
        return held

    def block(self, block_id: str, grant: str,
              buffer_for: Callable[[int], memoryview] | None = None
              ) -> bytes | memoryview:
        """The ciphertext the peer sends for BLOCK_ID (into BUFFER_FOR(length) if given).
        Not checked here: the caller hashes it against its id (a wrong one is
        Failure.WRONG_BYTES). Raises PeerFetchError."""
        body = PeerBlockRequest(grant=grant, id=block_id).model_dump_json().encode()
        return self._post(PEER_BLOCK_PATH, body, buffer_for)

    def _post(self, path: str, body: bytes,
              buffer_for: Callable[[int], memoryview] | None = None
              ) -> bytes | memoryview:
        addresses = self.peer.addresses
        while True:
            index = self._address
            url = f"https://{_url_host(addresses[index])}:{self.peer.port}{path}"
            try:
                with self._pool.stream("POST", url, headers=_JSON, content=body,
                                       extensions={"timeout": PEER_TIMEOUTS}) as response:
                    if response.status >= 400:
                        raise self._refusal(response.status, response.read())
                    return response.read() if buffer_for is None \
                        else _read_into(response, buffer_for)
            except _Untrusted as exc:
                raise PeerFetchError(f"not asking {self.name}: {exc}",
                                     Failure.REFUSED.value) from None
            except IntegrityError as exc:      # more bytes than a block can have
                raise PeerFetchError(f"{self.name}: {exc.message}",
                                     Failure.WRONG_BYTES.value) from None
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                with self._lock:
                    if self.device is None and index + 1 < len(addresses) \
                            and self._address == index:
                        self._address = index + 1    # never answered there: the next
                        continue
                raise self._failed(exc) from None
            except (httpcore.TimeoutException, httpcore.NetworkError,
                    httpcore.RemoteProtocolError, httpcore.ProtocolError, OSError) as exc:
                raise self._failed(exc) from None

    def _failed(self, exc: Exception) -> PeerFetchError:
        failure = Failure.TIMEOUT if isinstance(exc, httpcore.TimeoutException) \
            else Failure.ERROR
        text = (str(exc) or type(exc).__name__).splitlines()[0][:200]
        return PeerFetchError(f"{self.name}: {text}", failure.value)

    def _refusal(self, status: int, content: bytes) -> PeerFetchError:
        try:
            reason = str(json.loads(content)["reason"])
        except (ValueError, KeyError, TypeError):
            reason = f"HTTP {status}"
        if status == 404 and reason == "not_held":
            return PeerFetchError(f"{self.name} no longer holds the block",
                                  Failure.NOT_HELD.value)
        if status == 403:
            return PeerFetchError(f"{self.name} refused: {reason}", Failure.REFUSED.value)
        return PeerFetchError(f"{self.name} answered {status} ({reason})",
                              Failure.ERROR.value)


def failure_of(exc: CairnAgentError) -> Failure:
    """The policy's Failure for an error a peer fetch raised (wrong bytes: an
    IntegrityError from checking the block)."""
    if isinstance(exc, PeerFetchError):
        return Failure(exc.failure)
    if isinstance(exc, IntegrityError):
        return Failure.WRONG_BYTES
    return Failure.ERROR


def ask_have(clients: Sequence[PeerClient], ids: Sequence[str],
             grant_of: Mapping[str, str], deadline_s: float = READ_TIMEOUT_S
             ) -> dict[PeerClient, set[str]]:
    """Ask every one of CLIENTS at once (a thread each) which of IDS it holds; the
    answers that came within DEADLINE_S, each peer once by device (a peer seen under
    two records answers once). Peers that fail or say they hold nothing are left out."""
    answers: dict[PeerClient, set[str]] = {}
    lock = threading.Lock()

    def ask(client: PeerClient) -> None:
        started = time.monotonic()
        try:
            held = client.have(ids, grant_of)
        except PeerFetchError as exc:
            log.info("peer not used: %s", exc.message)
            return
        log.debug("%s holds %d of %d blocks (HAVE in %.0f ms)", client.name, len(held),
                  len(ids), (time.monotonic() - started) * 1000)
        if held:
            with lock:
                answers[client] = held

    threads = [threading.Thread(target=ask, args=(client,), daemon=True,
                                name="peer-have") for client in clients]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline_s
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    with lock:
        seen: set[str] = set()
        unique: dict[PeerClient, set[str]] = {}
        for client, held in answers.items():
            if client.name not in seen:
                seen.add(client.name)
                unique[client] = held
        return unique
