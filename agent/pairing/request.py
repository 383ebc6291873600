"""`cairn join --lan`: ask the user's other devices on the LAN to admit this one.

No code and no passphrase are typed here. The device makes its key (HOME/device-key.pem,
the one agent/peers/identity.py uses from then on) and a wrap key that lives in memory
only, serves its request over HTTPS (a self-signed certificate of the device key) on its
LAN addresses, advertises `_cairn-join._tcp`, and waits:

- the first hello fixes the approver and the code shown here (session.py);
- an approval, over mutual TLS with the hello's key, is checked before anything is kept:
  our device certificate (for our key, signed by the hello's CA), the appliance's
  certificate (pinned: it must answer at one of the approval's addresses, and `GET /me`
  with the new token must name this very device), and the user's keys (they must open
  with our wrap key and match the public key the appliance holds for the user);
- then device.json, keys, device-cert.pem and device-ca.pem are written (keys first,
  device.json last: a crash in between leaves a home that is not enrolled) and the
  command ends: "Joined as NAME (user U)".

An abort ends it with the approver's reason, the lifetime with "expired"; SIGTERM stops it
cleanly (the record is withdrawn, the sockets closed). One request per home at a time
(HOME/join-lan.lock). The lifetime is REQUEST_LIFETIME_S; CAIRN_JOIN_LIFETIME_S may make it
shorter (tests), never longer.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fcntl
import hashlib
import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ValidationError

from agent.client import pinned_ssl_context
from agent.errors import (
    CairnAgentError,
    EnrollmentError,
    IntegrityError,
    TransportError,
    UsageError,
)
from agent.home import AgentHome, DeviceRecord, write_private
from agent.pairing.endpoint import Endpoint
from agent.pairing.mdns import start_advertising, stop_advertising
from agent.pairing.pending import browse_interfaces
from agent.pairing.sealing import open_keys
from agent.pairing.session import Greeting, JoinSession, Refusal
from agent.peers.identity import KEY_FILE, device_key, public_key_pem, save_certificate
from protocol.models import DeviceCertificate, KeyBundle, Me
from protocol.pairing import (
    JOIN_ABORT_PATH,
    JOIN_APPROVE_PATH,
    JOIN_HELLO_PATH,
    JOIN_REQUEST_PATH,
    REQUEST_LIFETIME_S,
    JoinAbort,
    JoinApproval,
    JoinHello,
    JoinRequestInfo,
    format_code,
)

log = logging.getLogger("cairn.pairing")

LIFETIME_ENV = "CAIRN_JOIN_LIFETIME_S"
LOCK_FILE = "join-lan.lock"
CERT_FILE = "join-endpoint.pem"     # the endpoint's self-signed certificate, while it runs
FINISH_TIMEOUT_S = 20.0


def request_lifetime() -> float:
    """REQUEST_LIFETIME_S, or less if CAIRN_JOIN_LIFETIME_S says so (tests)."""
    text = os.environ.get(LIFETIME_ENV)
    if not text:
        return float(REQUEST_LIFETIME_S)
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{LIFETIME_ENV}={text!r} is not a number of seconds") from None
    return min(max(value, 1.0), float(REQUEST_LIFETIME_S))


@contextmanager
def home_lock(home: AgentHome) -> Iterator[None]:
    """One `join --lan` per home at a time (an advisory lock the kernel drops with us)."""
    home.ensure()
    fd = os.open(home.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UsageError(f"another `cairn join --lan` is already asking for {home.path} "
                             f"(process {holder}); let it finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def self_signed(key: Ed25519PrivateKey, until: float) -> bytes:
    """A certificate of KEY, signed by itself, for the endpoint (PEM). It names nothing:
    the request says who is asking, to whoever asks."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cairn join request")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(datetime.datetime.fromtimestamp(until + 3600, datetime.UTC))
            .sign(key, None))
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Event:
    kind: str                 # "greeted", "joined", "aborted", "failed"
    greeting: Greeting | None = None
    record: DeviceRecord | None = None
    message: str = ""


def _json(model: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(model, BaseModel):
        return model.model_dump_json().encode()
    return json.dumps(model).encode()


def _refused(refusal: Refusal) -> tuple[int, bytes]:
    return refusal.status, _json({"error": refusal.message})


class RequestShell:
    """The endpoint's application: the session behind a lock, the TLS context each new
    connection gets, and the events the command waits for. Runs in the endpoint's
    threads; the approval's checks and writes run in the trio loop (`finish`)."""

    def __init__(self, session: JoinSession, cert_path: str, key_path: str,
                 notify: Callable[[Event], None],
                 finish: Callable[[JoinApproval], Awaitable[DeviceRecord]],
                 token: trio.lowlevel.TrioToken) -> None:
        self.session = session
        self.lock = threading.Lock()
        self.notify = notify
        self.finish = finish
        self.token = token
        self.cert_path, self.key_path = cert_path, key_path
        self.context = self._context(None)

    def _context(self, client_ca: str | None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(self.cert_path, self.key_path)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_OPTIONAL
            context.load_verify_locations(cadata=client_ca)
        return context

    def context_for(self) -> ssl.SSLContext:
        with self.lock:
            return self.context

    def __call__(self, method: str, path: str, body: bytes, certificate: bytes | None
                 ) -> tuple[int, bytes]:
        route = (method, path)
        if route == ("GET", JOIN_REQUEST_PATH):
            with self.lock:
                closed = self.session.open(time.time())
            return _refused(closed) if closed else (200, _json(self.session.info))
        if route == ("POST", JOIN_HELLO_PATH):
            return self._hello(body)
        if route == ("POST", JOIN_APPROVE_PATH):
            return self._approve(body, certificate)
        if route == ("POST", JOIN_ABORT_PATH):
            return self._abort(body)
        return 404, _json({"error": "no such path"})

    def _hello(self, body: bytes) -> tuple[int, bytes]:
        try:
            hello = JoinHello.model_validate_json(body)
        except ValidationError:
            return 400, _json({"error": "malformed hello"})
        with self.lock:
            first = self.session.greeting is None
            outcome = self.session.hello(hello, time.time())
            if isinstance(outcome, Refusal):
                log.info("refused a hello: %s", outcome.message)
                return _refused(outcome)
            if first:
                self.context = self._context(outcome.ca_pem)
        if first:
            self.notify(Event("greeted", greeting=outcome))
        return 200, _json({"ok": True})

    def _approve(self, body: bytes, certificate: bytes | None) -> tuple[int, bytes]:
        try:
            approval = JoinApproval.model_validate_json(body)
        except ValidationError:
            return 400, _json({"error": "malformed approval"})
        with self.lock:
            outcome = self.session.begin_approval(certificate, time.time())
        if isinstance(outcome, Refusal):
            log.info("refused an approval: %s", outcome.message)
            return _refused(outcome)
        try:
            record = trio.from_thread.run(self.finish, approval, trio_token=self.token)
        except CairnAgentError as exc:
            message = exc.message
        except Exception as exc:   # whatever it was, the approver must hear an answer
            log.exception("checking the approval failed")
            message = f"checking the approval failed: {exc}"
        else:
            with self.lock:
                self.session.finished(True)
            self.notify(Event("joined", record=record))
            return 200, _json({"ok": True})
        with self.lock:
            self.session.finished(False)
        self.notify(Event("failed", message=message))
        return 400, _json({"error": message})

    def _abort(self, body: bytes) -> tuple[int, bytes]:
        try:
            reason = JoinAbort.model_validate_json(body).reason
        except ValidationError:
            return 400, _json({"error": "malformed abort"})
        with self.lock:
            refusal = self.session.abort(reason, time.time())
        if refusal is not None:
            return _refused(refusal)
        self.notify(Event("aborted", message=reason))
        return 200, _json({"ok": True})


# --- checking an approval and keeping what it gives ---------------------------------------


async def _ask_appliance(url: str, approval: JoinApproval) -> tuple[Me, KeyBundle]:
    """GET /me and the key bundle with the new token, trusting only the approval's
    certificate. Raises httpx errors, or EnrollmentError for an answer that is not 200."""
    async with httpx.AsyncClient(
            base_url=url, verify=pinned_ssl_context(approval.appliance_certificate),
            headers={"Authorization": f"Bearer {approval.token}"}, timeout=10) as client:
        me = await client.get("/me")
        bundle = await client.get("/me/key-bundle")
    for answer in (me, bundle):
        if answer.status_code != 200:
            raise EnrollmentError(f"the appliance at {url} refused the new device's token "
                                  f"(HTTP {answer.status_code})")
    return Me.model_validate_json(me.content), KeyBundle.model_validate_json(bundle.content)


async def finish(home: AgentHome, session: JoinSession, wrap: X25519PrivateKey,
                 approval: JoinApproval) -> DeviceRecord:
    """Check APPROVAL (see the module) and save what joining saves; the device record."""
    with trio.fail_after(FINISH_TIMEOUT_S):
        mine = session.check_approval(approval, time.time())
        if isinstance(mine, Refusal):
            raise EnrollmentError(mine.message)
        greeting = session.greeting
        assert greeting is not None
        try:
            der = ssl.PEM_cert_to_DER_cert(approval.appliance_certificate)
            sealed = base64.b64decode(approval.sealed_keys, validate=True)
        except (ValueError, binascii.Error):
            raise EnrollmentError("the approval is malformed") from None
        keys = open_keys(wrap, sealed, appliance_id=approval.appliance_id,
                         user=approval.user, device_id=approval.device_id)
        reasons: list[str] = []
        for url in approval.urls:
            try:
                me, bundle = await _ask_appliance(url, approval)
            except (httpx.HTTPError, ssl.SSLError, ValidationError) as exc:
                reasons.append(f"{url}: {exc}")
                continue
            if (me.device_id, me.user) != (approval.device_id, approval.user):
                raise EnrollmentError(f"the appliance at {url} says the token is device "
                                      f"{me.device_id} of {me.user}, not this device")
            if bundle.public_key is not None and \
                    base64.b64decode(bundle.public_key) != keys.public_key:
                raise IntegrityError(f"the keys handed over do not match the public key "
                                     f"the appliance holds for {approval.user}")
            record = DeviceRecord(
                appliance_id=approval.appliance_id, url=url,
                fingerprint=hashlib.sha256(der).hexdigest(),
                certificate=approval.appliance_certificate, device_id=approval.device_id,
                device_name=approval.device_name, user=approval.user, token=approval.token)
            home.save_keys(keys)
            save_certificate(home, DeviceCertificate(
                certificate=approval.device_certificate, ca_certificate=greeting.ca_pem,
                expires_at=mine.expires_at, user_tag=mine.user_tag),
                device_id=approval.device_id, appliance_id=approval.appliance_id)
            home.save_device(record)
            log.info("joined %s as device %s of %s, admitted by device %s", url,
                     approval.device_id, approval.user, greeting.approver.device_id)
            return record
        raise TransportError("the appliance did not answer at the address(es) the approval "
                             "gave: " + "; ".join(reasons))


# --- the command ---------------------------------------------------------------------------


async def join_lan(home: AgentHome, name: str, say: Callable[[str], None]) -> DeviceRecord:
    """Ask, wait, and join (see the module). SAY prints a line for the user."""
    if (home.path / "device.json").exists():
        raise UsageError(f"{home.path} has already joined an appliance; use another --home "
                         "to join again")
    lifetime = request_lifetime()
    interfaces = browse_interfaces(home)
    with home_lock(home):
        key = device_key(home)
        wrap = X25519PrivateKey.generate()
        created = time.time()
        info = JoinRequestInfo(
            device_name=name, device_key=public_key_pem(key),
            wrap_key=base64.b64encode(wrap.public_key().public_bytes_raw()).decode(),
            created_at=created, expires_at=created + lifetime)
        session = JoinSession(info, key, wrap.public_key().public_bytes_raw())
        cert_path = home.path / CERT_FILE
        write_private(cert_path, self_signed(key, info.expires_at))
        send, receive = trio.open_memory_channel[Event](16)
        token = trio.lowlevel.current_trio_token()

        def notify(event: Event) -> None:
            with suppress(trio.RunFinishedError, trio.WouldBlock):
                trio.from_thread.run_sync(send.send_nowait, event, trio_token=token)

        async def finish_here(approval: JoinApproval) -> DeviceRecord:
            return await finish(home, session, wrap, approval)

        shell = RequestShell(session, str(cert_path), str(home.path / KEY_FILE), notify,
                             finish_here, token)
        try:
            endpoint = Endpoint(interfaces, shell, shell.context_for)
        except OSError as exc:
            cert_path.unlink(missing_ok=True)
            raise TransportError(f"cannot listen on {', '.join(interfaces)}: "
                                 f"{exc.strerror}") from None
        try:
            return await _ask_and_wait(endpoint, info, say, receive)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(endpoint.close)
            cert_path.unlink(missing_ok=True)


async def _ask_and_wait(endpoint: Endpoint, info: JoinRequestInfo,
                        say: Callable[[str], None],
                        receive: trio.MemoryReceiveChannel[Event]) -> DeviceRecord:
    try:
        advertised = await start_advertising(endpoint.addresses, endpoint.port)
    except Exception as exc:     # zeroconf's own errors, OSError, RuntimeError
        raise TransportError(f"cannot ask on the LAN by mDNS: {exc}") from None
    name = info.device_name
    try:
        until = time.strftime("%H:%M:%S", time.localtime(info.expires_at))
        say(f"Asking your devices on this network to let {name} in (until {until}).")
        say(f"On one of your devices run: cairn approve {name}")
        with trio.move_on_after(max(0.0, info.expires_at - time.time())):
            async for event in receive:
                if event.kind == "greeted" and event.greeting is not None:
                    say(f"Code: {format_code(event.greeting.code)} — type it on the device "
                        "that approves (device "
                        f"{event.greeting.approver.device_id[:12]} answered)")
                elif event.kind == "joined" and event.record is not None:
                    return event.record
                elif event.kind == "aborted":
                    raise EnrollmentError(f"the request was ended by the device that "
                                          f"answered: {event.message}")
                elif event.kind == "failed":
                    raise EnrollmentError(f"the approval was refused: {event.message}")
        minutes = (info.expires_at - info.created_at) / 60
        raise EnrollmentError(f"the request expired after {minutes:.3g} min without an "
                              "approval; nothing was joined. Run `cairn join --lan` again")
    finally:
        await stop_advertising(advertised)
