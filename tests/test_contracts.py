"""The public contract: JSON Schemas in docs/schema/ match the models; bad input is refused at the edge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from activities.orders import find_order_id
from delivery.models import ReplyRequest
from starter import SCHEMA_DIR, json_schemas, new_delivery_id

ROOT = Path(__file__).resolve().parents[1]
VALID = {"delivery_id": "dlv-1", "tenant_id": "acme", "conversation_id": "c-1", "channel": "amazon",
         "to": "abc@marketplace.amazon.fr", "subject": "Re: order", "body_text": "Hello"}


def test_committed_json_schemas_match_the_models() -> None:
    for name, schema in json_schemas().items():
        committed = SCHEMA_DIR / name
        assert committed.exists(), f"{committed} missing: run `python starter.py schema`"
        assert json.loads(committed.read_text()) == schema, f"{name} is stale: run `python starter.py schema`"


def test_delivery_id_format() -> None:
    delivery_id = new_delivery_id()
    prefix, millis, suffix = delivery_id.split("-")
    assert prefix == "dlv" and millis.isdigit() and len(millis) == 13
    assert len(suffix) == 9 and suffix.isalnum() and suffix.lower() == suffix


@pytest.mark.parametrize(("field", "value", "message"), [
    ("tenant_id", "../evil", "String should match pattern"),
    ("tenant_id", "a/b", "String should match pattern"),
    ("tenant_id", "", "String should match pattern"),
    ("tenant_id", "a" * 64, "String should match pattern"),
    ("subject", "Hi\r\nBcc: x@y.example", "must not contain CR, LF or NUL"),
    ("to", "noreply@marketplace.amazon.fr", "no-reply address"),
    ("to", "not-an-address", "valid email address"),
    ("channel", "fax", "Input should be"),
    ("body_text", "x" * 100_001, "at most 100000 characters"),
    ("order_ref", "1" * 10_000, "at most 256 characters"),
    ("in_reply_to", "<a@b>\r\nX-Evil: 1", "must not contain CR, LF or NUL"),
])
def test_bad_request_fields_are_refused_naming_the_field(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ReplyRequest(**{**VALID, field: value})
    errors = refused.value.errors()
    assert errors[0]["loc"][0] == field
    assert message in str(refused.value)


@pytest.mark.parametrize(("candidates", "expected"), [
    (("#402-1234567-7654321", None, None), "402-1234567-7654321"),
    ((None, "amazon:402-1234567-7654321", "Re: 111-1111111-1111111"), "402-1234567-7654321"),
    ((None, None, "Re: Order 111-1111111-1111111"), "111-1111111-1111111"),
    (("1402-1234567-7654321", None, None), None),  # part of a longer number
    (("402-1234567-76543210", None, None), None),
    (("no order here", "", None), None),
])
def test_order_id_is_found_in_ref_then_thread_then_subject(candidates: tuple[str | None, ...],
                                                           expected: str | None) -> None:
    assert find_order_id(*candidates) == expected


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "starter.py"), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_cli_refuses_header_injection_with_exit_code_2_before_connecting() -> None:
    result = run_cli("send", "--tenant", "acme", "--channel", "email", "--to", "b@example.org",
                     "--subject", "Hi\r\nBcc: x@y.example", "--body", "hello")
    assert result.returncode == 2
    assert "--subject (subject): must not contain CR, LF or NUL characters" in result.stderr


def test_cli_refuses_path_traversal_tenant_with_exit_code_2() -> None:
    result = run_cli("send", "--tenant", "../evil", "--channel", "amazon", "--to", "b@example.org",
                     "--subject", "Hi", "--body", "hello")
    assert result.returncode == 2
    assert "--tenant (tenant_id)" in result.stderr


def test_cli_refuses_unknown_operator_action_with_exit_code_2() -> None:
    result = run_cli("signal", "dlv-1", "resend")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
