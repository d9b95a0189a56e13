"""SMTP acceptance (issue 5): STARTTLS + AUTH through the workflow, the relay's answers and lost replies.

End to end on a real Temporal server (the time-skipping one where the story waits out a backoff) with
the SMTP sink: what the sink received, and the delivery's trace and history.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from delivery.models import DeliveryTrace
from delivery.settings import Settings
from devstack.smtp import SmtpSink
from tests.conftest import Deliveries, worker_with
from workflows import policies

RELAY_USER = "agent"
RELAY_PASSWORD = "relay-password-S3cr3t"
SENDER = "Boutique Café <support@shop.example>"
BUYER = "zoe.martin@example.org"
BUYER_MESSAGE_ID = "<CAF.buyer-42@mail.example.org>"
SUBJECT = "Re: Réponse à votre commande ✓ — 日本語も"
BODY = "Bonjour Zoë,\n\nvotre colis est parti ce matin. Ça arrive jeudi ✓\n\nCordialement,\nL'équipe"


@pytest.fixture(scope="module")
def secure_sink() -> Iterator[SmtpSink]:
    """A relay as production has it: STARTTLS required, then AUTH."""
    with SmtpSink(starttls=True, auth={RELAY_USER: RELAY_PASSWORD}) as sink:
        yield sink


@pytest.fixture
def relay(secure_sink: SmtpSink) -> SmtpSink:
    secure_sink.reset()
    return secure_sink


def through(relay: SmtpSink, settings: Settings, password: str = RELAY_PASSWORD) -> Settings:
    """`settings` sending through the STARTTLS relay, trusting its certificate, logging in."""
    smtp = settings.smtp.model_copy(update={
        "host": "127.0.0.1", "port": relay.smtp_port, "security": "starttls", "username": RELAY_USER,
        "password": SecretStr(password), "ca_file": str(relay.cert_path), "validate_certs": True,
        "from_address": SENDER})
    return settings.model_copy(update={"smtp": smtp})


async def history_text(client: Client, delivery_id: str) -> str:
    """The exported history with its payloads decoded (payload data is base64 in the JSON export)."""
    exported = (await client.get_workflow_handle(delivery_id).fetch_history()).to_json()
    parts = [exported]

    def walk(node: Any) -> None:
        if isinstance(node, dict | list):
            for value in node.values() if isinstance(node, dict) else node:
                walk(value)
        elif isinstance(node, str) and len(node) >= 8:
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                parts.append(base64.b64decode(node, validate=True).decode("utf-8"))

    walk(json.loads(exported))
    return "\n".join(parts)


def step_outcomes(trace: DeliveryTrace, step: str) -> list[tuple[str, int | None]]:
    return [(e.outcome, e.attempt) for e in trace.events if e.step == step]


async def activity_failures(client: Client, delivery_id: str, activity: str) -> list[dict[str, Any]]:
    """Each failed attempt of `activity` as the history holds it: the error type, message and details."""
    history = await client.get_workflow_handle(delivery_id).fetch_history()
    scheduled = {e.event_id: e.activity_task_scheduled_event_attributes.activity_type.name
                 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED}
    failures = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
            continue
        attributes = event.activity_task_failed_event_attributes
        if scheduled[attributes.scheduled_event_id] != activity:
            continue
        failure = attributes.failure
        info = failure.application_failure_info
        details = [json.loads(p.data) for p in info.details.payloads]
        failures.append({"type": info.type, "message": failure.message, "details": details[0] if details else {}})
    return failures


# --- 1. STARTTLS + AUTH through the workflow ---------------------------------------------------------


async def test_a_reply_goes_through_a_starttls_relay_with_auth_threaded_and_intact(
        temporal_env: WorkflowEnvironment, settings: Settings, relay: SmtpSink) -> None:
    async with worker_with(temporal_env, through(relay, settings), "starttls_auth") as deliveries:
        trace = await deliveries.deliver(channel="email", to=BUYER, subject=SUBJECT, body_text=BODY,
                                         in_reply_to=BUYER_MESSAGE_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP")
    [mail] = relay.messages()
    assert mail["tls"] is True and mail["auth_user"] == RELAY_USER
    assert mail["mail_from"] == "support@shop.example" and mail["rcpt_tos"] == [BUYER]
    assert mail["message_id"] == trace.email_message_id == f"<{trace.delivery_id}@shop.example>"
    assert mail["headers"]["In-Reply-To"] == BUYER_MESSAGE_ID
    assert mail["headers"]["References"] == BUYER_MESSAGE_ID
    assert mail["headers"]["From"] == SENDER
    assert mail["subject"] == SUBJECT
    assert mail["text"] == BODY + "\n"
    seen_by_temporal = await history_text(deliveries.client, trace.delivery_id)
    assert "votre colis est parti ce matin" in seen_by_temporal  # the scan reads the payloads ...
    assert RELAY_PASSWORD not in seen_by_temporal  # ... and the relay's password is in none of them


# --- 2. what the relay answers ------------------------------------------------------------------------


async def test_a_relay_answering_451_twice_gets_the_reply_on_the_third_attempt(
        skipping_deliveries: Deliveries, smtp: SmtpSink) -> None:
    smtp.add_fault(451, times=2, stage="rcpt", message="4.7.1 Greylisted, please try again later")

    trace = await skipping_deliveries.deliver(channel="email", to=BUYER)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP")
    assert step_outcomes(trace, "smtp_send") == [("failed", 1), ("failed", 2), ("ok", 3)]
    failed = [e.detail or "" for e in trace.events if e.step == "smtp_send" and e.outcome == "failed"]
    assert all("SMTP 451 4.7.1 Greylisted" in detail for detail in failed)
    backoffs = [policies.SMTP_SEND.backoff(n) for n in (1, 2)]
    assert [f"retry in {int(b.total_seconds())}s" in d for b, d in zip(backoffs, failed, strict=True)] == [True, True]
    [mail] = smtp.messages()
    assert mail["message_id"] == trace.email_message_id


async def test_a_relay_answering_550_fails_the_delivery_at_once_with_its_reply(
        deliveries: Deliveries, smtp: SmtpSink) -> None:
    smtp.add_fault(550, times=1, stage="rcpt", message="5.1.1 <zoe.martin@example.org>: Recipient address rejected")

    trace = await deliveries.deliver(channel="email", to=BUYER)

    assert (trace.status, trace.provider_final) == ("failed", None)
    # The relay's reply, with the buyer's address redacted (personal data stays out of the trace row).
    assert trace.note == "SMTP failed: SMTP 550 5.1.1 <address>: Recipient address rejected"
    assert step_outcomes(trace, "smtp_send") == [("permanent", 1)]
    assert smtp.messages() == []
    [failure] = await activity_failures(deliveries.client, trace.delivery_id, "smtp_send")
    assert (failure["type"], failure["details"].get("reason")) == ("permanent", "rejected")


async def test_a_relay_refusing_the_login_with_535_is_a_permanent_configuration_error(
        temporal_env: WorkflowEnvironment, settings: Settings, relay: SmtpSink) -> None:
    wrong = "not-the-relay-password"
    async with worker_with(temporal_env, through(relay, settings, password=wrong), "smtp_535") as deliveries:
        trace = await deliveries.deliver(channel="email", to=BUYER)

    assert (trace.status, trace.provider_final) == ("failed", None)
    assert trace.note is not None and trace.note.startswith("SMTP failed: SMTP 535")
    assert step_outcomes(trace, "smtp_send") == [("permanent", 1)]  # no retry: time does not fix a password
    assert relay.messages() == []
    [failure] = await activity_failures(deliveries.client, trace.delivery_id, "smtp_send")
    assert (failure["type"], failure["details"].get("reason")) == ("permanent", "configuration")
    assert wrong not in await history_text(deliveries.client, trace.delivery_id)


# --- 4. a reply lost after the message went out ----------------------------------------------------------


async def test_a_connection_lost_after_data_is_retried_and_both_receptions_carry_one_message_id(
        skipping_deliveries: Deliveries, smtp: SmtpSink) -> None:
    smtp.add_fault(421, times=1, stage="drop_after_data")

    trace = await skipping_deliveries.deliver(channel="email", to=BUYER, in_reply_to=BUYER_MESSAGE_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP")
    assert step_outcomes(trace, "smtp_send") == [("failed", 1), ("ok", 2)]
    [lost] = [e.detail or "" for e in trace.events if e.step == "smtp_send" and e.outcome == "failed"]
    assert "the receiver may have the mail" in lost
    first, second = smtp.messages()  # at-least-once: the receiver has it twice ...
    assert first["message_id"] == second["message_id"] == trace.email_message_id  # ... as one message
    assert first["text"] == second["text"]
