"""A rogue on the LAN for tests/integration/test_lan_pairing.py: run inside its namespace,
it finds the join requests there, makes a device CA and a device certificate of an appliance
of its own (cryptography, nothing of the real appliance's), and says hello to every request
first. Prints one JSON line: {"hellos": [HTTP status, ...]}.

    python pairing_rogue.py ADDRESS     (ADDRESS: the rogue's own LAN address, to browse on)
"""

from __future__ import annotations

import datetime
import json
import secrets
import sys

import httpx
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.api import body_of
from agent.pairing.mdns import browse
from agent.pairing.pending import read_request, untrusting_context
from protocol.pairing import JOIN_HELLO_PATH, JoinHello


def certificates(appliance_id: str) -> tuple[str, str]:
    """(CA PEM, device certificate PEM) of a made-up appliance."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cairn device CA rogue")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, None))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, secrets.token_hex(16)),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, secrets.token_hex(8)),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, appliance_id)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, None))
    return (ca.public_bytes(serialization.Encoding.PEM).decode(),
            cert.public_bytes(serialization.Encoding.PEM).decode())


async def main(address: str) -> None:
    appliance_id = secrets.token_hex(16)
    ca, cert = certificates(appliance_id)
    hello = JoinHello(appliance_id=appliance_id, ca_certificate=ca, device_certificate=cert)
    statuses = []
    for endpoint in await browse(4.0, [address]):
        for url in endpoint.urls():
            found = await read_request(url)
            if isinstance(found, str):
                continue
            async with httpx.AsyncClient(base_url=url, verify=untrusting_context(),
                                         timeout=10) as client:
                answer = await client.post(JOIN_HELLO_PATH, json=body_of(hello))
            statuses.append(answer.status_code)
            break
    print(json.dumps({"hellos": statuses}), flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
