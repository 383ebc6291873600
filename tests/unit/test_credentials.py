"""Enrollment codes, proofs and device tokens (protocol.enrollment, appliance.credentials)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.credentials import new_device_token, token_digest
from protocol.enrollment import (
    EnrollmentCode,
    MalformedCodeError,
    enrollment_proof,
    enrollment_response,
    parse_code_id,
)


@given(st.binary(min_size=5, max_size=5), st.binary(min_size=9, max_size=9))
def test_codes_round_trip(code_id: bytes, secret: bytes) -> None:
    code = EnrollmentCode(code_id, secret)
    text = code.format()
    assert len(text) == 29 and text.count("-") == 5
    assert EnrollmentCode.parse(text) == code
    assert EnrollmentCode.parse(text.lower().replace("-", " ")) == code
    assert parse_code_id(code.code_id_text) == code_id


def test_lookalike_letters_are_read_as_digits() -> None:
    code = EnrollmentCode(b"\x00" * 5, b"\x01" * 9)
    text = code.format()
    assert "0" in text
    assert EnrollmentCode.parse(text.replace("0", "O")) == code


def test_typos_are_caught_by_the_check_character() -> None:
    code = EnrollmentCode.generate()
    text = code.format().replace("-", "")
    caught = 0
    for position in range(len(text)):
        replacement = "A" if text[position] != "A" else "B"
        typo = text[:position] + replacement + text[position + 1:]
        try:
            parsed = EnrollmentCode.parse(typo)
        except MalformedCodeError:
            caught += 1
        else:
            assert parsed != code
    assert caught >= len(text) - 2  # one check byte: 1 in 256 typos slip through


@pytest.mark.parametrize("text", ["", "ABCD", "ABCD-EFGH-JKMN-PQRS-TVWX-YZ0U",
                                  "!!!!-!!!!-!!!!-!!!!-!!!!-!!!!"])
def test_malformed_codes(text: str) -> None:
    with pytest.raises(MalformedCodeError):
        EnrollmentCode.parse(text)


def test_proof_binds_the_certificate_and_the_nonce() -> None:
    code = EnrollmentCode.generate()
    nonce, fingerprint = os.urandom(32), os.urandom(32)
    proof = enrollment_proof(code.key(), nonce, fingerprint)
    assert proof == enrollment_proof(code.key(), nonce, fingerprint)
    assert proof != enrollment_proof(code.key(), nonce, os.urandom(32))  # an impostor's cert
    assert proof != enrollment_proof(code.key(), os.urandom(32), fingerprint)  # a replay
    assert proof != enrollment_proof(EnrollmentCode.generate().key(), nonce, fingerprint)
    assert proof != enrollment_response(code.key(), nonce, fingerprint)  # not interchangeable


def test_device_tokens_are_random_and_stored_hashed() -> None:
    first, second = new_device_token(), new_device_token()
    assert first != second and first.startswith("cairn_dev_")
    assert len(token_digest(first)) == 32 and token_digest(first) != token_digest(second)
