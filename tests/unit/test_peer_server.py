"""The peer server (agent/peers/server.py) on 127.0.0.1, in this process: real TLS 1.3
with certificates and grants made here the way the appliance makes them
(test_peer_identity's CA), real HTTP clients. What it serves, and each refusal — with
nothing served. (tests/integration/test_peer_service.py does the same against a real
appliance and real agents.)"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from test_peer_identity import CA, identity, make_ca

from agent.peers.identity import PeerIdentity
from agent.peers.server import PeerServer, Us, authorize
from protocol.peers import (
    GRANT_LIFETIME_S,
    PEER_BLOCK_PATH,
    PEER_HAVE_PATH,
    PEER_MAX_BODY,
    Grant,
    sign_grant,
)

BLOCKS = {f"{i:02x}" * 32: bytes([i]) * (1000 + i) for i in range(1, 6)}
USER = "u-1"


class Held:
    def __init__(self, blocks: dict[str, bytes]) -> None:
        self.blocks = blocks
        self.reads = 0

    def holds(self, block_ids: Sequence[str]) -> list[str]:
        return [b for b in block_ids if b in self.blocks]

    def read(self, block_id: str) -> bytes | None:
        self.reads += 1
        return self.blocks.get(block_id)


@dataclass
class Setup:
    ca: CA
    me: PeerIdentity
    server: PeerServer
    source: Held
    revoked: set[str]

    def grant(self, device: PeerIdentity, ids: list[str], *, ttl: float = GRANT_LIFETIME_S,
              ca: CA | None = None, user: str = USER) -> str:
        return sign_grant((ca or self.ca).key, Grant(
            appliance_id=self.ca.appliance_id, device_id=device.me.device_id,
            key_sha256=device.me.key_sha256, user_tag=user,
            expires_at=int(time.time() + ttl), blocks=frozenset(ids)))

    def client(self, device: PeerIdentity | None, context: ssl.SSLContext | None = None
               ) -> http.client.HTTPSConnection:
        if context is None:
            assert device is not None
            context = device.client_context()
        return http.client.HTTPSConnection("127.0.0.1", self.server.port, context=context,
                                           timeout=10)


def post(connection: http.client.HTTPSConnection, path: str, body: object
         ) -> tuple[int, bytes]:
    connection.request("POST", path, json.dumps(body).encode(),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


@pytest.fixture
def setup() -> Iterator[Setup]:
    ca = make_ca()
    me = identity(ca, device_id="dev-server", user_tag=USER)
    source = Held(BLOCKS)
    revoked: set[str] = set()
    server = PeerServer(me.server_context(),
                        Us(ca.appliance_id, me.me.user_tag, me.ca_public_key()),
                        source, revoked.__contains__, idle_timeout_s=5)
    server.listen(["127.0.0.1"], 0)
    server.start()
    try:
        yield Setup(ca, me, server, source, revoked)
    finally:
        server.stop()


def test_a_device_with_a_grant_gets_the_exact_blocks_on_one_connection(setup: Setup
                                                                       ) -> None:
    peer = identity(setup.ca, device_id="dev-peer", user_tag=USER)
    ids = sorted(BLOCKS)
    grant = setup.grant(peer, ids)
    connection = setup.client(peer)
    status, body = post(connection, PEER_HAVE_PATH, {"grants": [grant],
                                                     "ids": [*ids, "f" * 64][1:]})
    # f*64 is not covered: the whole question is refused, not answered in part.
    assert status == 403 and json.loads(body)["reason"] == "other_blocks"
    status, body = post(connection, PEER_HAVE_PATH, {"grants": [grant], "ids": ids})
    assert status == 200 and json.loads(body) == {"have": ids}
    for block_id in ids:
        status, body = post(connection, PEER_BLOCK_PATH, {"grant": grant, "id": block_id})
        assert status == 200 and body == BLOCKS[block_id]
    counters = setup.server.counters.snapshot()
    assert counters["served_blocks"] == len(ids)
    assert counters["served_bytes"] == sum(map(len, BLOCKS.values()))
    assert counters["connections"] == 1
    assert counters["refusals"] == {"other_blocks": 1}


def test_a_block_not_held_is_404(setup: Setup) -> None:
    peer = identity(setup.ca, device_id="dev-peer", user_tag=USER)
    missing = "9" * 64
    status, body = post(setup.client(peer), PEER_BLOCK_PATH,
                        {"grant": setup.grant(peer, [missing]), "id": missing})
    assert status == 404 and json.loads(body)["reason"] == "not_held"


def refused(setup: Setup, device: PeerIdentity, grant: str, block_id: str) -> str:
    reads = setup.source.reads
    status, body = post(setup.client(device), PEER_BLOCK_PATH, {"grant": grant,
                                                                "id": block_id})
    assert status == 403, body
    assert setup.source.reads == reads          # refused before anything was read
    return str(json.loads(body)["reason"])


def test_every_refusal_serves_nothing(setup: Setup) -> None:
    peer = identity(setup.ca, device_id="dev-peer", user_tag=USER)
    other = identity(setup.ca, device_id="dev-other", user_tag=USER)
    stranger = identity(setup.ca, device_id="dev-stranger", user_tag="u-2")
    block = sorted(BLOCKS)[0]
    assert refused(setup, peer, setup.grant(peer, [block], ttl=-1), block) == "expired"
    assert refused(setup, peer, setup.grant(other, [block]), block) == "other_device"
    assert refused(setup, peer, setup.grant(peer, [sorted(BLOCKS)[1]]), block) == \
        "other_blocks"
    assert refused(setup, peer, setup.grant(peer, [block], ca=make_ca()), block) == "forged"
    assert refused(setup, peer, "cg1.AAAA.BBBB", block) == "forged"
    assert refused(setup, peer, "not a grant", block) == "malformed"
    assert refused(setup, stranger, setup.grant(stranger, [block], user="u-2"), block) \
        == "other_user"
    setup.revoked.add("dev-peer")
    assert refused(setup, peer, setup.grant(peer, [block]), block) == "revoked"
    counters = setup.server.counters.snapshot()
    assert counters["served_blocks"] == 0
    assert counters["refusals"] == {"expired": 1, "other_device": 1, "other_blocks": 1,
                                    "forged": 2, "malformed": 1, "other_user": 1,
                                    "revoked": 1}


def test_a_revocation_applies_to_the_next_request_of_an_open_connection(setup: Setup
                                                                        ) -> None:
    peer = identity(setup.ca, device_id="dev-peer", user_tag=USER)
    block = sorted(BLOCKS)[0]
    grant = setup.grant(peer, [block])
    connection = setup.client(peer)
    assert post(connection, PEER_BLOCK_PATH, {"grant": grant, "id": block})[0] == 200
    setup.revoked.add("dev-peer")
    status, body = post(connection, PEER_BLOCK_PATH, {"grant": grant, "id": block})
    assert status == 403 and json.loads(body)["reason"] == "revoked"


def handshake_fails(setup: Setup, context: ssl.SSLContext) -> None:
    connection = http.client.HTTPSConnection("127.0.0.1", setup.server.port,
                                             context=context, timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        post(connection, PEER_BLOCK_PATH, {"grant": "x", "id": sorted(BLOCKS)[0]})


def test_a_client_without_a_certificate_or_with_a_foreign_one_fails_the_handshake(
        setup: Setup) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=setup.ca.pem.decode())
    handshake_fails(setup, bare)
    # A certificate another CA signed (a self-made one), trusting our CA all the same.
    foreign_ca = make_ca(setup.ca.appliance_id)
    forger = identity(foreign_ca, device_id="dev-peer", user_tag=USER)
    context = forger.client_context()
    context.load_verify_locations(cadata=setup.ca.pem.decode())
    handshake_fails(setup, context)
    deadline = time.monotonic() + 5
    while setup.server.counters.snapshot()["refusals"].get("handshake", 0) < 2 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    counters = setup.server.counters.snapshot()
    assert counters["refusals"] == {"handshake": 2}
    assert counters["served_blocks"] == 0 and setup.source.reads == 0


def test_bodies_past_the_limit_and_garbage_are_refused(setup: Setup) -> None:
    peer = identity(setup.ca, device_id="dev-peer", user_tag=USER)
    connection = setup.client(peer)
    connection.putrequest("POST", PEER_HAVE_PATH)   # a body too long is not even read
    connection.putheader("Content-Length", str(PEER_MAX_BODY + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    response.read()
    connection = setup.client(peer)
    assert post(connection, PEER_HAVE_PATH, {"grants": [], "ids": ["a" * 64]})[0] == 403
    assert post(connection, PEER_BLOCK_PATH, {"id": "a" * 64})[0] == 403
    assert post(connection, PEER_HAVE_PATH, {"grants": ["x"]})[0] == 400
    assert post(connection, PEER_HAVE_PATH, [1, 2])[0] == 400
    assert post(connection, "/elsewhere", {})[0] == 404
    assert setup.source.reads == 0
    assert setup.server.counters.snapshot()["refusals"] == {"no_grant": 2}


def test_an_idle_connection_is_closed_and_connections_are_bounded() -> None:
    ca = make_ca()
    me = identity(ca, device_id="dev-server", user_tag=USER)
    server = PeerServer(me.server_context(), Us(ca.appliance_id, USER, me.ca_public_key()),
                        Held({}), lambda _: False, max_connections=1,
                        handshake_timeout_s=1, idle_timeout_s=1)
    server.listen(["127.0.0.1"], 0)
    server.start()
    try:
        first = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        time.sleep(0.3)
        second = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        assert second.recv(1) == b""             # no slot: closed at once
        assert first.recv(1) == b""              # no handshake within a second: closed
        first.close()
        second.close()
        deadline = time.monotonic() + 5         # counted as the thread ends
        while "handshake" not in server.counters.snapshot()["refusals"] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        counters = server.counters.snapshot()["refusals"]
        assert counters.get("busy") == 1 and counters.get("handshake") == 1
    finally:
        server.stop()


def test_authorize_checks_the_certificate_before_the_grant() -> None:
    ca = make_ca()
    me = identity(ca, device_id="dev-server", user_tag=USER)
    stranger = identity(ca, device_id="dev-stranger", user_tag="u-2")
    us = Us(ca.appliance_id, USER, me.ca_public_key())
    from agent.peers.server import Refused
    with pytest.raises(Refused) as refused_:
        authorize(stranger.me, us, lambda _: False, ["garbage"], ["a" * 64], time.time())
    assert refused_.value.reason == "other_user"
    with pytest.raises(Refused) as refused_:
        authorize(None, us, lambda _: False, [], [], time.time())
    assert refused_.value.reason == "bad_certificate"
    with pytest.raises(Refused) as refused_:
        authorize(me.me, us, lambda _: False, [], ["a" * 64], time.time())
    assert refused_.value.reason == "no_grant"
