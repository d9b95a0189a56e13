"""Hostile input at every edge: the CLI (`starter.py send|signal`), `start_delivery` (the API's entry, and
what another language sends as plain JSON), and the operator-action update validators.

Every refusal names the field, and nothing starts: no workflow, no Vault read, no SP-API request, no
mail. Content that is valid input but not valid for SP-API (HTML, addresses, length) goes by SMTP with
the rule named, and SP-API never sees a POST. (Model-level cases of tests/test_contracts.py are not
repeated here.)
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.orders import find_order_id
from delivery.models import MAX_BODY_CHARS, DeliveryTrace, OperatorActionInput, ReplyRequest
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from devstack.vault import VaultStandIn
from starter import EXIT_BAD_INPUT, new_delivery_id, run
from tests.conftest import ORDER_ID, RELAY_ADDRESS, Deliveries

ROOT = Path(__file__).resolve().parents[1]
ONE_MB = 1024 * 1024
ARABIC_INDIC_ORDER_ID = "٤٠٢-١٢٣٤٥٦٧-٧٦٥٤٣٢١"  # 402-1234567-7654321 in Arabic-Indic digits


@pytest.fixture
def cli(temporal_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch) -> WorkflowEnvironment:
    """`starter.py` run in-process against the test server, so that a start that slipped through would show."""
    for name in ("OUTBOUND_CODEC_KEYS", "OUTBOUND_CODEC_ENCRYPT_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OUTBOUND_TEMPORAL_ADDRESS", temporal_env.client.service_client.config.target_host)
    return temporal_env


async def never_started(client: Client, delivery_id: str) -> bool:
    try:
        await client.get_workflow_handle(delivery_id).describe()
    except RPCError as err:
        return err.status == RPCStatusCode.NOT_FOUND
    return False


SEND = ["send", "--tenant", "acme", "--channel", "amazon", "--to", RELAY_ADDRESS, "--subject", "Re: your order"]


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        argv = list(argv)
        argv[argv.index(flag) + 1] = value
        return argv
    return [*argv, flag, value]


# --- starter.py send -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--to", "buyer@example.org\nBcc: everyone@example.org", "--to (to):"),
    ("--to", "buyer@example.org\0", "--to (to):"),
    ("--from", "support@acme-shop.example\r\nBcc: x@evil.example", "--from (from_address):"),
    ("--subject", "Re: order\0", "--subject (subject): must not contain CR, LF or NUL characters"),
    ("--subject", "Re: order\nX-Priority: 1", "--subject (subject): must not contain CR, LF or NUL characters"),
    ("--in-reply-to", "<abc@mail.example.org>\rX-Evil: 1", "--in-reply-to (in_reply_to): must not contain CR, LF"),
    ("--channel", "AMAZON", "--channel (channel): Input should be 'amazon', 'email'"),
    ("--channel", "amazon ", "--channel (channel): Input should be"),
    ("--channel", "fax", "--channel (channel): Input should be"),
    ("--tenant", "..", "--tenant (tenant_id): String should match pattern"),
    ("--tenant", "acme/../bistro", "--tenant (tenant_id): String should match pattern"),
    ("--tenant", "acme%2F..%2Fbistro", "--tenant (tenant_id): String should match pattern"),
    ("--tenant", "\u0430cme", "--tenant (tenant_id): String should match pattern"),  # Cyrillic small a
    ("--tenant", "\uff41cme", "--tenant (tenant_id): String should match pattern"),  # fullwidth small a
    ("--tenant", "acme\n", "--tenant (tenant_id): String should match pattern"),
    ("--tenant", "Acme", "--tenant (tenant_id): String should match pattern"),
    ("--order-ref", "4" * 10_000, "--order-ref (order_ref): String should have at most 256 characters"),
    ("--thread-key", "amazon:" + "9" * 10_000, "--thread-key (thread_key): String should have at most 256"),
    ("--conversation", "c" * 10_000, "--conversation (conversation_id): String should have at most 256"),
    ("--marketplace", "a13v1ib3viyzzh", "--marketplace (marketplace_id): String should match pattern"),
    ("--message-type", "sendInvoice", "--message-type (spapi_message_type): Input should be"),
    ("--body", "x" * ONE_MB, f"--body (body_text): String should have at most {MAX_BODY_CHARS} characters"),
])
async def test_cli_send_refuses_naming_the_field_and_starts_nothing(
        cli: WorkflowEnvironment, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str) -> None:
    delivery_id = new_delivery_id()
    argv = with_option([*SEND, "--delivery-id", delivery_id, "--body", "Hello"], flag, value)

    assert await run(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert await never_started(cli.client, delivery_id)


@pytest.mark.parametrize("delivery_id", ["../../etc", "dlv-1\r\nX", "dlv 1", "x" * 200, "dlv-1.", "dlv..1"])
async def test_cli_send_refuses_a_hostile_delivery_id(cli: WorkflowEnvironment, capsys: pytest.CaptureFixture[str],
                                                      delivery_id: str) -> None:
    assert await run([*SEND, "--delivery-id", delivery_id, "--body", "Hello"]) == EXIT_BAD_INPUT
    assert "--delivery-id (delivery_id)" in capsys.readouterr().err


@pytest.mark.parametrize(("content", "message"), [
    ("x" * ONE_MB, f"--body (body_text): String should have at most {MAX_BODY_CHARS} characters"),
    ("Hello\0world", "body_text must not contain NUL characters"),
])
async def test_cli_send_refuses_a_body_file_naming_the_limit(cli: WorkflowEnvironment, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str], content: str,
                                                             message: str) -> None:
    body = tmp_path / "reply.txt"
    body.write_text(content, encoding="utf-8")
    delivery_id = new_delivery_id()

    assert await run([*SEND, "--delivery-id", delivery_id, "--body-file", str(body)]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert await never_started(cli.client, delivery_id)


@pytest.mark.parametrize("flag", ["--body-file", "--body-html-file"])
async def test_cli_send_refuses_a_file_that_is_not_utf8(cli: WorkflowEnvironment, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], flag: str) -> None:
    bad = tmp_path / "reply.txt"
    bad.write_bytes(b"Caf\xe9 ferm\xe9 \xff\xfe")  # Latin-1, not UTF-8
    argv = [*SEND, "--delivery-id", new_delivery_id(), flag, str(bad)]
    if flag == "--body-html-file":
        argv += ["--body", "Hello"]

    assert await run(argv) == EXIT_BAD_INPUT
    assert f"{flag}: {bad} is not valid UTF-8 text" in capsys.readouterr().err


def test_the_cli_process_refuses_bad_bytes_with_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "reply.txt"
    bad.write_bytes(b"\xc3\x28 invalid continuation")
    result = subprocess.run([sys.executable, "starter.py", *SEND, "--body-file", str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_BAD_INPUT
    assert "--body-file" in result.stderr and "is not valid UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr


# --- start_delivery: what the API and other languages send ------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("to", "buyer@example.org\r\nBcc: all@example.org"), ("tenant_id", "ac\u0430me"),
    ("tenant_id", "acme/.."), ("channel", "Amazon"), ("order_ref", "4" * 10_000), ("body_text", "x" * ONE_MB),
    ("delivery_id", "dlv-1/../x"), ("awaiting_action_hours", 24 * 365),
])
def test_api_input_is_refused_naming_the_field_before_start_delivery(field: str, value: Any) -> None:
    payload = {"delivery_id": new_delivery_id(), "tenant_id": "acme", "conversation_id": "c-1", "channel": "amazon",
               "to": RELAY_ADDRESS, "subject": "Re: order", "body_text": "Hello", field: value}
    with pytest.raises(ValidationError) as refused:
        ReplyRequest.model_validate(payload)
    assert [error["loc"][0] for error in refused.value.errors()] == [field]


async def test_plain_json_start_with_a_header_injection_fails_naming_the_field(deliveries: Deliveries,
                                                                             smtp: SmtpSink) -> None:
    # Another language's client starts the workflow with plain JSON, so no pydantic on its side: the
    # worker is the edge, and the delivery must fail at once, saying which field, sending nothing.
    plain = await Client.connect(deliveries.client.service_client.config.target_host)
    delivery_id = new_delivery_id()
    payload = {"delivery_id": delivery_id, "tenant_id": "acme", "conversation_id": "c-1", "channel": "email",
               "to": "buyer@example.org", "subject": "Hi\r\nBcc: all@example.org", "body_text": "Hello"}
    handle = await plain.start_workflow("ReplyDeliveryWorkflow", payload, id=delivery_id,
                                        task_queue=deliveries.settings.temporal.task_queue)
    try:
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), timeout=30)
        assert "subject" in str(failed.value.cause)
        assert smtp.messages() == []
    finally:
        with contextlib.suppress(RPCError):  # still running only while the bug is there
            await handle.terminate("test cleanup")


# --- content SP-API must not carry: SMTP with the rule named, never an SP-API POST --------------------


def spapi_posts(spapi: SpapiStandIn) -> list[dict[str, Any]]:
    return [r for r in spapi.requests() if r.get("method") == "POST" and "/messages/" in str(r.get("path"))]


@pytest.mark.parametrize(("body", "rule"), [
    ("<p>Your parcel left today.</p>", "text contains HTML markup"),
    ("Hello<br/>Your parcel left today.", "text contains HTML markup"),
    ("Your parcel left today &amp; will arrive Monday.", "text contains HTML markup"),
    ("Write to me at jane.doe@example.org for anything else.", "text contains an email address"),
    ("x" * MAX_BODY_CHARS, "allows at most 2,000"),
])
async def test_text_spapi_refuses_goes_by_smtp_with_the_rule_named_and_no_post(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink, vault: VaultStandIn, body: str,
        rule: str) -> None:
    trace = await deliveries.deliver(order_ref=ORDER_ID, body_text=body)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note and rule in trace.note
    assert spapi_posts(spapi) == [] and spapi.messages() == []
    [mail] = smtp.messages()
    assert mail["rcpt_tos"] == [RELAY_ADDRESS]
    assert body[:1000] in str(mail)


def test_an_order_ref_in_other_scripts_digits_is_not_an_order_id() -> None:
    assert find_order_id(f"#{ARABIC_INDIC_ORDER_ID}", None, None) is None


# --- operator actions: the CLI and the update validators ---------------------------------------------


async def parked_in_smtp_backoff(deliveries: Deliveries, smtp: SmtpSink) -> WorkflowHandle[Any, DeliveryTrace]:
    smtp.add_fault(451, times=1000, stage="rcpt")
    handle = await deliveries.start(deliveries.request(subject="Where is my parcel?"))
    for _ in range(200):
        trace = await handle.query("trace", result_type=DeliveryTrace)
        if any(e.step == "smtp_send" and e.outcome == "failed" for e in trace.events):
            return handle
        await asyncio.sleep(0.05)
    raise AssertionError("the delivery never reached its SMTP backoff")


@pytest.mark.parametrize(("argv", "message"), [
    (["set_order_id", "402-1234567-7654321\nX"], "ORDER_ID (order_id): String should match pattern"),
    (["set_order_id", "4" * 10_000], "ORDER_ID (order_id): String should match pattern"),
    (["mark_delivered", "n" * ONE_MB], "NOTE (note): String should have at most 2000 characters"),
    (["retry", "--by", "b" * 10_000], "by (by): String should have at most 200 characters"),
    (["force_smtp", "--reason", "r" * ONE_MB], "reason (reason): String should have at most 2000 characters"),
    pytest.param(["set_order_id", ARABIC_INDIC_ORDER_ID], "ORDER_ID (order_id)"),
])
async def test_cli_signal_refuses_naming_the_field_and_writes_nothing(
        deliveries: Deliveries, smtp: SmtpSink, cli: WorkflowEnvironment, capsys: pytest.CaptureFixture[str],
        argv: list[str], message: str) -> None:
    handle = await parked_in_smtp_backoff(deliveries, smtp)
    try:
        assert await run(["signal", handle.id, *argv]) == EXIT_BAD_INPUT
        assert message in capsys.readouterr().err
        trace = await handle.query("trace", result_type=DeliveryTrace)
        assert not [e for e in trace.events if e.step == "operator"]
    finally:
        await handle.cancel()


@pytest.mark.parametrize("args", [
    {"order_id": "402-1234567-7654321\r\nX-Evil: 1"},
    {"order_id": "402-1234567-7654321", "unknown": "field"},
    {"note": "n" * ONE_MB},
    {"order_id": ["402-1234567-7654321"]},
])
async def test_a_plain_json_update_with_hostile_arguments_is_rejected_and_written_nowhere(
        deliveries: Deliveries, smtp: SmtpSink, spapi: SpapiStandIn, args: dict[str, Any]) -> None:
    handle = await parked_in_smtp_backoff(deliveries, smtp)
    plain = await Client.connect(deliveries.client.service_client.config.target_host)
    try:
        with pytest.raises(WorkflowUpdateFailedError):
            await plain.get_workflow_handle(handle.id).execute_update("set_order_id", args)
        trace = await handle.query("trace", result_type=DeliveryTrace)
        assert not [e for e in trace.events if e.step == "operator"] and trace.order_id is None
        assert spapi_posts(spapi) == []
    finally:
        await handle.cancel()


async def test_a_rejected_plain_json_update_names_the_field(deliveries: Deliveries, smtp: SmtpSink) -> None:
    handle = await parked_in_smtp_backoff(deliveries, smtp)
    plain = await Client.connect(deliveries.client.service_client.config.target_host)
    try:
        with pytest.raises(WorkflowUpdateFailedError) as rejected:
            await plain.get_workflow_handle(handle.id).execute_update("set_order_id", {"order_id": "12-345"})
        assert "order_id" in str(rejected.value.cause)
    finally:
        await handle.cancel()


def test_the_typed_update_argument_refuses_unicode_digits() -> None:
    with pytest.raises(ValidationError) as refused:
        OperatorActionInput(order_id=ARABIC_INDIC_ORDER_ID)
    assert refused.value.errors()[0]["loc"] == ("order_id",)
