"""`cairnd user ...` and `cairnd device ...` against a real home (and a real server for
the effect of a revocation)."""

from __future__ import annotations

import json
from collections.abc import Callable
from subprocess import CompletedProcess

from api_helpers import enroll
from cairnd_helpers import MakeHome, serving

from protocol.enrollment import EnrollmentCode

Cairnd = Callable[..., CompletedProcess[str]]


def test_users_codes_devices_and_revocation(appliance_home: MakeHome, cairnd: Cairnd) -> None:
    config = appliance_home(disks=4, data_shards=2, parity_shards=1)
    home = config.home
    added = cairnd("user", "add", "alice", "--home", home)
    assert added.returncode == 0, added.stderr
    code = added.stdout.strip().splitlines()[-1]
    EnrollmentCode.parse(code)  # the last line is exactly a code
    assert "valid once until" in added.stdout

    again = cairnd("user", "add", "alice", "--home", home)
    assert again.returncode == 2
    assert again.stderr.strip() == ("cairnd: error: user alice already exists "
                                    "(add a device with `cairnd user code alice`)")
    for bad in ("../x", "Alice", "", "a" * 40):
        refused = cairnd("user", "add", bad, "--home", home)
        assert refused.returncode == 2 and "invalid user name" in refused.stderr
        assert "Traceback" not in refused.stderr
    unknown = cairnd("user", "code", "nobody", "--home", home)
    assert unknown.returncode == 2 and unknown.stderr.strip() == \
        "cairnd: error: no user named 'nobody'"

    with serving(home) as server:
        laptop = enroll(server.url, config.tls_certificate, code, "laptop")
        phone_code = cairnd("user", "code", "alice", "--home", home).stdout.splitlines()[-1]
        assert phone_code != code
        phone = enroll(server.url, config.tls_certificate, phone_code, "phone")

        users = json.loads(cairnd("user", "list", "--json", "--home", home).stdout)
        assert [(u["name"], u["devices"]) for u in users] == [("alice", 2)]
        devices = json.loads(cairnd("device", "list", "--json", "--home", home).stdout)
        assert {(d["id"], d["name"], d["revoked"]) for d in devices} == {
            (laptop.device_id, "laptop", False), (phone.device_id, "phone", False)}
        table = cairnd("device", "list", "--home", home).stdout
        assert "laptop" in table and "active" in table

        revoked = cairnd("device", "revoke", laptop.device_id, "--home", home)
        assert revoked.returncode == 0, revoked.stderr
        # Takes effect at once on the running server.
        refused = laptop.get("/me")
        assert refused.status_code == 401
        assert "revoked" in refused.json()["error"]["message"]
        assert phone.get("/me").status_code == 200
        listed = json.loads(cairnd("device", "list", "--json", "--home", home).stdout)
        assert {d["name"]: d["revoked"] for d in listed} == {"laptop": True, "phone": False}
        missing = cairnd("device", "revoke", "dev_nope", "--home", home)
        assert missing.returncode == 2 and "no device" in missing.stderr
        laptop.close()
        phone.close()
        assert server.stop() == 0
