"""The protocol package: ids, the API version rule, the mDNS record, and the agent's check
of the version an appliance answers with."""

from __future__ import annotations

import re

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.client import Connection
from agent.errors import IncompatibleApplianceError
from protocol import ids, version
from protocol.errors import ErrorCode
from protocol.mdns import DiscoveredAppliance, parse_record, txt_record

FINGERPRINT = "ab" * 32


def test_ids_match_exactly_their_pattern() -> None:
    assert ids.is_node_id(ids.new_node_id())
    assert not ids.is_node_id(ids.new_node_id() + "\n")   # `$` would have let this in
    assert not ids.is_node_id("A" * 32) and not ids.is_node_id("0" * 31)
    assert ids.is_block_id("0" * 64) and not ids.is_block_id("0" * 64 + "\n")


@given(st.binary(max_size=200))
def test_base64_round_trips(data: bytes) -> None:
    assert ids.b64decode(ids.b64encode(data)) == data


@pytest.mark.parametrize("text", ["not base64!", "abc", "YQ==\n", "YQ"])
def test_anything_but_strict_base64_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ids.b64decode(text)


@pytest.mark.parametrize(("theirs", "compatible"), [
    ("1.0", True), ("1.9", True), ("1", True), ("2.0", False), ("0.3", False)])
def test_only_the_major_version_must_match(theirs: str, compatible: bool) -> None:
    if compatible:
        version.check_compatible(theirs, "1.0")
    else:
        with pytest.raises(version.IncompatibleApiError, match=re.escape(theirs)):
            version.check_compatible(theirs, "1.0")


def test_the_message_says_which_side_to_update() -> None:
    with pytest.raises(version.IncompatibleApiError, match="update this agent"):
        version.check_compatible("2.0", "1.0")
    with pytest.raises(version.IncompatibleApiError, match="update the appliance"):
        version.check_compatible("1.0", "2.0")
    with pytest.raises(version.IncompatibleApiError, match="not an API version"):
        version.check_compatible("banana", "1.0")


def _answer(headers: dict[str, str]) -> httpx.Response:
    return httpx.Response(200, headers=headers, json={})


@pytest.mark.parametrize(("headers", "ok"), [
    ({version.HEADER: version.API_VERSION}, True),
    ({}, True),                                   # an appliance older than the header
    ({version.HEADER: "9.0"}, False)])
def test_the_agent_checks_the_first_answer_version(headers: dict[str, str], ok: bool) -> None:
    connection = Connection.__new__(Connection)   # only the check, no network
    connection._version_checked = False
    if ok:
        connection._check_version(_answer(headers))
        assert connection._version_checked
    else:
        with pytest.raises(IncompatibleApplianceError, match=r"9\.0") as raised:
            connection._check_version(_answer(headers))
        assert raised.value.exit_code == 12


@given(appliance_id=st.text(min_size=1, max_size=40).filter(lambda t: "\x00" not in t),
       port=st.integers(1, 65535),
       addresses=st.lists(st.ip_addresses().map(str), min_size=1, max_size=3))
def test_the_mdns_record_parses_back(appliance_id: str, port: int,
                                     addresses: list[str]) -> None:
    properties = txt_record(appliance_id, port, FINGERPRINT, addresses)
    assert parse_record(properties, addresses, port, "n") == DiscoveredAppliance(
        appliance_id=appliance_id, api_version=version.API_VERSION, fingerprint=FINGERPRINT,
        addresses=tuple(addresses), port=port, name="n")


def test_every_error_code_is_named_once() -> None:
    values = [code.value for code in ErrorCode]
    assert len(values) == len(set(values))
    assert ErrorCode.of("not_found") is ErrorCode.NOT_FOUND
    assert ErrorCode.of("from_a_newer_appliance") is None
