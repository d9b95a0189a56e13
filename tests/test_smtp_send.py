"""`smtp_send` against the in-process SMTP sink (STARTTLS + AUTH), through Temporal's ActivityEnvironment."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes
from email.policy import default as default_policy
from typing import Any

import aiosmtplib
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.smtp import SmtpActivities, build_message, classify_smtp_error
from delivery.failures import failure_details
from delivery.models import SmtpSendInput, SmtpSendResult
from delivery.settings import SmtpSettings, SmtpTenantOverride
from devstack.smtp import SmtpSink

PASSWORD = "relay-password-S3cr3t"
SENDER = "Boutique Café <support@shop.example>"
RELAY_ADDRESS = "x7kq2m9vzp3b4@marketplace.amazon.fr"
BUYER_MESSAGE_ID = "<CAF.buyer-42@marketplace.amazon.fr>"
SUBJECT = "Réponse à votre commande ✓"
BODY = "Bonjour Zoë,\n\nvotre colis 402-1234567-7654321 est parti ce matin.\n\nCordialement,\nL'équipe"
NOW = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def secure_sink() -> Iterator[SmtpSink]:
    with SmtpSink(starttls=True, auth={"agent": PASSWORD}) as sink:
        yield sink


@pytest.fixture(scope="module")
def plain_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def relay(secure_sink: SmtpSink) -> SmtpSink:
    secure_sink.reset()
    return secure_sink


@pytest.fixture
def tenant_relay(plain_sink: SmtpSink) -> SmtpSink:
    plain_sink.reset()
    return plain_sink


@pytest.fixture
def settings(relay: SmtpSink) -> SmtpSettings:
    return SmtpSettings(host=relay.host, port=relay.smtp_port, security="starttls", username="agent",
                        password=PASSWORD, ca_file=str(relay.cert_path), from_address=SENDER, timeout_s=5,
                        tenants={})


def reply(**fields: Any) -> SmtpSendInput:
    values: dict[str, Any] = {"delivery_id": "dlv-1772357400000-k3j9x2m1q", "tenant_id": "acme",
                              "to": RELAY_ADDRESS, "subject": SUBJECT, "body_text": BODY}
    values.update(fields)
    return SmtpSendInput(**values)


class Attempt:
    """One activity attempt, with the heartbeats it sent."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.activities = SmtpActivities(settings)
        self.heartbeats: list[Any] = []
        self.env = ActivityEnvironment()
        self.env.on_heartbeat = lambda *details: self.heartbeats.append(details[0])

    async def run(self, request: SmtpSendInput) -> SmtpSendResult:
        result: SmtpSendResult = await self.env.run(self.activities.smtp_send, request)
        return result

    async def fail(self, request: SmtpSendInput) -> ApplicationError:
        with pytest.raises(ApplicationError) as failed:
            await self.run(request)
        return failed.value


def assert_failure(error: ApplicationError, kind: str, reason: str | None = None) -> None:
    assert error.type == kind, error
    assert failure_details(error).get("reason") == reason, error


# --- delivery ------------------------------------------------------------------------------------


async def test_reply_goes_out_over_starttls_with_auth_threaded_and_intact(relay: SmtpSink,
                                                                           settings: SmtpSettings) -> None:
    attempt = Attempt(settings)
    result = await attempt.run(reply(in_reply_to=BUYER_MESSAGE_ID))

    assert result.message_id == "<dlv-1772357400000-k3j9x2m1q@shop.example>"
    assert result.server_reply.startswith("250 ")
    [received] = relay.messages()
    assert received["tls"] is True and received["auth_user"] == "agent"
    assert received["mail_from"] == "support@shop.example"
    assert received["rcpt_tos"] == [RELAY_ADDRESS]
    assert received["message_id"] == result.message_id
    assert received["headers"]["In-Reply-To"] == BUYER_MESSAGE_ID
    assert received["headers"]["References"] == BUYER_MESSAGE_ID
    assert received["headers"]["From"] == SENDER
    assert received["subject"] == SUBJECT
    assert received["text"] == BODY + "\n"
    assert received["html"] is None
    assert attempt.heartbeats == ["connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "quit"]


async def test_html_alternative_and_dot_lines_arrive_intact(relay: SmtpSink, settings: SmtpSettings) -> None:
    # ASCII lines go out as 7bit, so a lone "." line would end DATA early if it were not dot-stuffed.
    body = "First line\n.\n.. two dots\n.hidden\nLast line"
    await Attempt(settings).run(reply(subject="Re: dots", body_text=body, body_html="<p>Bonjour ✓</p>"))

    [received] = relay.messages()
    assert received["text"] == body + "\n"
    assert received["html"] == "<p>Bonjour ✓</p>\n"


async def test_internationalized_recipient_goes_out_with_smtputf8(relay: SmtpSink, settings: SmtpSettings) -> None:
    await Attempt(settings).run(reply(to="zoë@exemple.fr"))

    [received] = relay.messages()
    assert received["rcpt_tos"] == ["zoë@exemple.fr"]
    assert received["subject"] == SUBJECT


# --- failures ------------------------------------------------------------------------------------


async def test_451_is_transient(relay: SmtpSink, settings: SmtpSettings) -> None:
    relay.add_fault(451, message="4.7.1 greylisted, try again later")

    error = await Attempt(settings).fail(reply())

    assert_failure(error, "transient")
    assert error.message == "SMTP 451 4.7.1 greylisted, try again later"
    assert not error.non_retryable
    assert relay.messages() == []


async def test_550_is_permanent_with_the_servers_text(relay: SmtpSink, settings: SmtpSettings) -> None:
    relay.add_fault(550, message="5.1.1 mailbox unavailable")

    error = await Attempt(settings).fail(reply())

    assert_failure(error, "permanent", "rejected")
    assert error.message == "SMTP 550 5.1.1 mailbox unavailable"
    assert error.non_retryable
    assert relay.messages() == []


async def test_a_refusal_at_the_end_of_data_is_final_not_ambiguous(relay: SmtpSink,
                                                                   settings: SmtpSettings) -> None:
    relay.add_fault(554, stage="data", message="5.7.1 message content rejected")

    error = await Attempt(settings).fail(reply())

    assert_failure(error, "permanent", "rejected")
    assert error.message == "SMTP 554 5.7.1 message content rejected"


async def test_wrong_password_is_a_configuration_error_that_never_shows_the_password(
        relay: SmtpSink, settings: SmtpSettings) -> None:
    wrong = "wrong-password-Xy9"
    error = await Attempt(settings.model_copy(update={"password": SecretStr(wrong)})).fail(reply())

    assert_failure(error, "permanent", "configuration")
    assert error.message.startswith("SMTP 535 ")
    assert wrong not in repr(error) and wrong not in str(error.details)
    assert relay.messages() == []


async def test_connection_lost_after_data_is_ambiguous_and_the_retry_is_deduplicable(
        relay: SmtpSink, settings: SmtpSettings) -> None:
    relay.add_fault(0, stage="drop_after_data")

    error = await Attempt(settings).fail(reply())
    assert_failure(error, "ambiguous")
    assert "the receiver may have the mail" in error.message
    assert len(relay.messages()) == 1  # it did

    result = await Attempt(settings).run(reply())  # what the workflow does next: SMTP is at-least-once
    assert [m["message_id"] for m in relay.messages()] == [result.message_id] * 2


async def test_unreachable_relay_is_transient(settings: SmtpSettings) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    error = await Attempt(settings.model_copy(update={"port": closed_port})).fail(reply())

    assert_failure(error, "transient")
    assert "before the message was sent" in error.message


async def test_relay_that_does_not_answer_in_time_is_transient(settings: SmtpSettings) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never greets
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        error = await Attempt(settings.model_copy(update={"port": port, "timeout_s": 0.3})).fail(reply())

    assert_failure(error, "transient")


async def test_relay_without_starttls_is_not_used_in_clear_text(tenant_relay: SmtpSink,
                                                                settings: SmtpSettings) -> None:
    error = await Attempt(settings.model_copy(update={"port": tenant_relay.smtp_port})).fail(reply())

    assert_failure(error, "permanent", "configuration")
    assert "does not offer STARTTLS" in error.message
    assert tenant_relay.messages() == []


async def test_certificates_are_verified_by_default(relay: SmtpSink, settings: SmtpSettings) -> None:
    assert SmtpSettings.model_fields["validate_certs"].default is True
    error = await Attempt(settings.model_copy(update={"ca_file": None})).fail(reply())

    # Permanent "configuration": retrying the same handshake cannot succeed (see classify_smtp_error).
    assert_failure(error, "permanent", "configuration")
    assert "certificate could not be verified" in error.message
    assert "OUTBOUND_SMTP_CA_FILE" in error.message
    assert relay.messages() == []


# --- refusals: nothing is sent -------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"subject": "Re: order\r\nBcc: everyone@example.com"},
    {"subject": "Re: order\nX-Injected: 1"},
    {"to": "buyer@example.com\r\nBcc: everyone@example.com"},
    {"in_reply_to": "<a@b>\r\nBcc: everyone@example.com"},
    {"from_address": "support@shop.example\rBcc: x@y.z"},
    {"delivery_id": "dlv-1\n"},
])
async def test_header_injection_is_refused_before_connecting(relay: SmtpSink, settings: SmtpSettings,
                                                             fields: dict[str, Any]) -> None:
    attempt = Attempt(settings)
    error = await attempt.fail(reply(**fields))

    assert_failure(error, "permanent", "invalid_input")
    assert attempt.heartbeats == []  # never connected
    assert relay.messages() == []


@pytest.mark.parametrize("to", ["no-reply@marketplace.amazon.fr", "NoReply@example.com",
                                "donotreply@example.com", "Do-Not-Reply@example.com"])
async def test_no_reply_address_is_refused(relay: SmtpSink, settings: SmtpSettings, to: str) -> None:
    error = await Attempt(settings).fail(reply(to=to))

    assert_failure(error, "permanent", "invalid_input")
    assert "no-reply address" in error.message
    assert relay.messages() == []


# --- per-tenant relays ---------------------------------------------------------------------------


async def test_tenant_override_sends_through_its_own_relay_and_sender(
        relay: SmtpSink, tenant_relay: SmtpSink, settings: SmtpSettings) -> None:
    override = SmtpTenantOverride(host=tenant_relay.host, port=tenant_relay.smtp_port, security="none",
                                  from_address="Acme Support <replies@acme.example>")
    attempt = Attempt(settings.model_copy(update={"tenants": {"acme": override}}))

    result = await attempt.run(reply(tenant_id="acme"))
    await attempt.run(reply(tenant_id="globex"))

    [acme_mail] = tenant_relay.messages()
    assert result.message_id == "<dlv-1772357400000-k3j9x2m1q@acme.example>"
    assert acme_mail["mail_from"] == "replies@acme.example"
    assert acme_mail["headers"]["From"] == "Acme Support <replies@acme.example>"
    # The global relay's login went nowhere near the tenant's relay (it offers no AUTH: a login
    # attempt would have failed the send).
    assert acme_mail["auth_user"] is None
    [globex_mail] = relay.messages()
    assert globex_mail["mail_from"] == "support@shop.example"


async def test_request_sender_wins_over_the_configured_one(relay: SmtpSink, settings: SmtpSettings) -> None:
    result = await Attempt(settings).run(reply(from_address="seller@brand.example"))

    assert result.message_id.endswith("@brand.example>")
    assert relay.messages()[0]["mail_from"] == "seller@brand.example"


def test_tenant_overrides_come_from_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOUND_SMTP_USERNAME", "global-user")
    monkeypatch.setenv("OUTBOUND_SMTP_PASSWORD", "global-secret")
    monkeypatch.setenv("OUTBOUND_SMTP_TENANTS", json.dumps({
        "acme": {"host": "smtp.acme.example", "port": 465, "security": "tls", "password": "acme-secret"},
        "globex": {"from_address": "help@globex.example"},
    }))
    settings = SmtpSettings()

    acme = settings.for_tenant("acme")
    assert (acme.host, acme.port, acme.security) == ("smtp.acme.example", 465, "tls")
    assert acme.username is None  # another host never gets the global login
    assert acme.password is not None and acme.password.get_secret_value() == "acme-secret"
    globex = settings.for_tenant("globex")
    assert (globex.host, globex.username, globex.from_address) == ("127.0.0.1", "global-user", "help@globex.example")
    assert settings.for_tenant("initech") is settings
    assert "secret" not in repr(settings)


# --- build_message -------------------------------------------------------------------------------


def test_message_headers_and_threading() -> None:
    message = build_message(reply(in_reply_to=BUYER_MESSAGE_ID), SENDER, NOW)

    assert message["Message-ID"] == "<dlv-1772357400000-k3j9x2m1q@shop.example>"
    assert message["Date"] == "Sun, 01 Mar 2026 09:30:00 +0000"
    assert message["From"] == SENDER
    assert message["To"] == RELAY_ADDRESS
    assert message["Subject"] == SUBJECT
    assert message["In-Reply-To"] == message["References"] == BUYER_MESSAGE_ID
    assert not message.is_multipart()
    assert message.get_content_type() == "text/plain"
    assert message.get_content_charset() == "utf-8"


def test_message_id_is_stable_and_uses_the_senders_domain() -> None:
    first = build_message(reply(), "support@Shop.Example", NOW)
    again = build_message(reply(), "support@shop.example", datetime.now(UTC))

    assert first["Message-ID"] == again["Message-ID"] == "<dlv-1772357400000-k3j9x2m1q@shop.example>"


def test_message_without_in_reply_to_has_no_threading_headers() -> None:
    message = build_message(reply(), SENDER, NOW)

    assert "In-Reply-To" not in message and "References" not in message


def test_html_makes_a_multipart_alternative() -> None:
    message = build_message(reply(body_html="<p>Bonjour</p>"), SENDER, NOW)

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == ["text/plain", "text/html"]


def test_wire_form_is_7bit_with_encoded_subject_and_display_name() -> None:
    wire = bytes(build_message(reply(), SENDER, NOW))

    assert wire.isascii()  # no relay needs 8BITMIME
    assert b"\r\n" in wire and b"\n" not in wire.replace(b"\r\n", b"")
    assert b"=?utf-8?" in wire
    parsed = message_from_bytes(wire.replace(b"\r\n", b"\n"), policy=default_policy)
    assert parsed["Subject"] == SUBJECT
    assert parsed["From"] == SENDER
    assert parsed.get_body(("plain",)).get_content() == BODY + "\n"  # type: ignore[union-attr]


@pytest.mark.parametrize(("from_address", "fields"), [
    ("not-an-address", {}),
    (SENDER, {"to": "nobody"}),
    ("support@shop.example\r\nBcc: x@y.z", {}),
    (SENDER, {"subject": "Re: order\0"}),
    (SENDER, {"to": "noreply@marketplace.amazon.fr"}),
])
def test_build_message_refuses_what_must_not_be_sent(from_address: str, fields: dict[str, Any]) -> None:
    with pytest.raises(ApplicationError) as refused:
        build_message(reply(**fields), from_address, NOW)

    assert_failure(refused.value, "permanent", "invalid_input")


# --- classify_smtp_error -------------------------------------------------------------------------


def _verification_failure() -> BaseException:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "self-signed certificate"
    wrapped = aiosmtplib.SMTPConnectError("Error connecting to relay on port 465")
    wrapped.__cause__ = error
    return wrapped


@pytest.mark.parametrize(("error", "after_data", "kind", "reason", "message"), [
    (aiosmtplib.SMTPRecipientRefused(450, "4.2.1 mailbox busy", "a@b.c"), False, "transient", None,
     "SMTP 450 4.2.1 mailbox busy"),
    (aiosmtplib.SMTPDataError(451, "4.3.0 try\nlater"), True, "transient", None, "SMTP 451 4.3.0 try later"),
    (aiosmtplib.SMTPConnectResponseError(421, "4.3.2 busy"), False, "transient", None, "SMTP 421 4.3.2 busy"),
    (aiosmtplib.SMTPRecipientRefused(550, "5.1.1 mailbox unavailable", "a@b.c"), False, "permanent",
     "rejected", "SMTP 550 5.1.1 mailbox unavailable"),
    (aiosmtplib.SMTPDataError(554, "5.7.1 spam"), True, "permanent", "rejected", "SMTP 554 5.7.1 spam"),
    (aiosmtplib.SMTPAuthenticationError(535, "5.7.8 bad credentials"), False, "permanent", "configuration",
     "SMTP 535 5.7.8 bad credentials"),
    (aiosmtplib.SMTPResponseException(534, "5.7.9 weak mechanism"), False, "permanent", "configuration",
     "SMTP 534 5.7.9 weak mechanism"),
    (aiosmtplib.SMTPResponseException(530, "5.7.0 authentication required"), False, "permanent",
     "configuration", "SMTP 530 5.7.0 authentication required"),
    (aiosmtplib.SMTPConnectError("Error connecting to relay on port 587: refused"), False, "transient", None,
     "before the message was sent"),
    (aiosmtplib.SMTPServerDisconnected("Connection lost"), False, "transient", None, "Connection lost"),
    (aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"), False, "transient", None,
     "Timed out"),
    (TimeoutError(), False, "transient", None, "TimeoutError"),
    (aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"), True, "ambiguous", None,
     "the receiver may have the mail"),
    (aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"), True, "ambiguous", None,
     "the receiver may have the mail"),
    (aiosmtplib.SMTPResponseException(-1, "Malformed SMTP response line"), True, "ambiguous", None,
     "Malformed"),
    (_verification_failure(), False, "permanent", "configuration", "self-signed certificate"),
])
def test_classification_table(error: BaseException, after_data: bool, kind: str, reason: str | None,
                              message: str) -> None:
    failure = classify_smtp_error(error, after_data=after_data)

    assert_failure(failure, kind, reason)
    assert message in failure.message
    assert failure.non_retryable == (kind != "transient")
