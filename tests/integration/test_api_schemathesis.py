"""Schemathesis against the live appliance's /openapi.json: for every operation, valid and
invalid requests generated from the schema, sent with a device token over TLS pinned to the
appliance's certificate; no answer may be a server error (5xx).

The operations are listed from the app itself at import (one test each, so a new route is
fuzzed without anyone adding it here) and must match what the live server documents.
`/events` streams forever: its calls carry a short timeout, after which schemathesis keeps
what it read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import pytest
import requests
import schemathesis
from api_helpers import add_user, create_file, enroll, make_root, upload
from cairnd_helpers import serving
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from appliance.config import write_config
from appliance.home import init_home
from appliance.server import create_app

pytestmark = pytest.mark.slow   # ~1,500 generated requests
EXAMPLES_PER_MODE = 25
STREAM_EXAMPLES = 4
STREAM_TIMEOUT_S = 0.5


def documented_operations() -> list[tuple[str, str]]:
    app = create_app(cast(Any, None), cast(Any, None))  # only to read its schema
    return sorted((method.upper(), path) for path, operations in app.openapi()["paths"].items()
                  for method in operations)


OPERATIONS = documented_operations()


@dataclass
class Live:
    url: str
    schema: schemathesis.BaseSchema
    session: requests.Session
    certificate: str          # pinned: requests trusts the appliance's own certificate
    token: str


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    config = init_home(tmp_path_factory.mktemp("fuzz") / "appliance", disks=4,
                       data_shards=2, parity_shards=1, reserve_free_bytes=0,
                       listen="127.0.0.1:0")
    # Rate limiting has its own test; here it would only turn requests into 429s.
    write_config(replace(config, rate_limit_per_s=1e6, rate_limit_burst=10**6))
    with serving(config.home) as server:
        device = enroll(server.url, config.tls_certificate, add_user(config.home, "alice"))
        root = make_root(device)  # something to find, for the fuzzer and for its ids
        data = os.urandom(2000)
        upload(device, create_file(device, root["id"], [data])["upload"], [data])
        spec = device.ok(device.get("/openapi.json"))
        schema = schemathesis.openapi.from_dict(spec)
        session = requests.Session()
        yield Live(server.url, schema, session, str(config.tls_certificate), device.token)
        session.close()
        device.close()
        assert "Traceback" not in server.stderr(), server.stderr()[-5000:]


def test_the_live_schema_documents_every_operation(live: Live) -> None:
    live_operations = sorted(
        (result.ok().method.upper(), result.ok().path)
        for result in live.schema.get_all_operations())
    assert live_operations == OPERATIONS


@pytest.mark.parametrize("key", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(live: Live, key: tuple[str, str]) -> None:
    method, path = key
    operation = live.schema[path][method]
    stream = path == "/events"
    timeout = STREAM_TIMEOUT_S if stream else 30.0

    def fuzz(mode: schemathesis.GenerationMode) -> None:
        @settings(max_examples=STREAM_EXAMPLES if stream else EXAMPLES_PER_MODE,
                  deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=live.url, session=live.session,
                                 verify=live.certificate, timeout=timeout,
                                 headers={"Authorization": f"Bearer {live.token}"})
            case.validate_response(response, checks=[not_a_server_error])

        run()

    fuzz(schemathesis.GenerationMode.POSITIVE)
    # Unsatisfiable: every parameter is a free-form string, no request violates the schema.
    with contextlib.suppress(Unsatisfiable):
        fuzz(schemathesis.GenerationMode.NEGATIVE)
