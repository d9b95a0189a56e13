"""The SMTP stand-in, driven by a real SMTP client (aiosmtplib) and its HTTP control API."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest

from devstack.smtp import SmtpSink

PASSWORD = "sink-test-password"
SUBJECT = "Réponse à votre commande ✓"
BODY = "Bonjour,\nvotre colis est parti ce matin. Café offert ✓\n"


@pytest.fixture(scope="module")
def plain_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture(scope="module")
def secure_sink() -> Iterator[SmtpSink]:
    with SmtpSink(starttls=True, auth={"agent": PASSWORD}) as sink:
        yield sink


@pytest.fixture
def sink(plain_sink: SmtpSink) -> SmtpSink:
    plain_sink.reset()
    return plain_sink


@pytest.fixture
def tls_sink(secure_sink: SmtpSink) -> SmtpSink:
    secure_sink.reset()
    return secure_sink


def mail(to: str = "buyer@marketplace.amazon.fr", subject: str = SUBJECT,
         html: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "support@shop.example"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = "<dlv-1@shop.example>"
    message.set_content(BODY)
    if html is not None:
        message.add_alternative(html, subtype="html")
    return message


async def send_plain(sink: SmtpSink, message: EmailMessage) -> Any:
    return await aiosmtplib.send(message, hostname=sink.host, port=sink.smtp_port, start_tls=False)


async def send_secure(sink: SmtpSink, message: EmailMessage, password: str = PASSWORD) -> Any:
    assert sink.cert_path is not None
    return await aiosmtplib.send(message, hostname=sink.host, port=sink.smtp_port, start_tls=True,
                                 cert_bundle=str(sink.cert_path), username="agent", password=password)


async def test_plain_mail_is_kept_with_utf8_subject_and_body_decoded(sink: SmtpSink) -> None:
    await send_plain(sink, mail(html="<p>Bonjour ✓</p>"))

    [received] = sink.messages()
    assert received["mail_from"] == "support@shop.example"
    assert received["rcpt_tos"] == ["buyer@marketplace.amazon.fr"]
    assert received["message_id"] == "<dlv-1@shop.example>"
    assert received["subject"] == SUBJECT
    assert received["headers"]["Subject"] == SUBJECT
    assert received["text"] == BODY
    assert received["html"] == "<p>Bonjour ✓</p>\n"
    assert received["tls"] is False and received["auth_user"] is None
    age = dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(received["received_at"])
    assert dt.timedelta(0) <= age < dt.timedelta(seconds=30)


async def test_text_only_mail_has_no_html(sink: SmtpSink) -> None:
    await send_plain(sink, mail())

    assert sink.messages()[0]["html"] is None


async def test_starttls_and_auth_with_the_sinks_certificate_trusted(tls_sink: SmtpSink) -> None:
    await send_secure(tls_sink, mail())

    [received] = tls_sink.messages()
    assert received["tls"] is True
    assert received["auth_user"] == "agent"
    assert received["subject"] == SUBJECT


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_certificate_passes_strict_verification_for_both_names(tls_sink: SmtpSink, host: str) -> None:
    assert tls_sink.cert_path is not None
    context = ssl.create_default_context(cafile=str(tls_sink.cert_path))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # the default from Python 3.13 on

    await aiosmtplib.send(mail(), hostname=host, port=tls_sink.smtp_port, start_tls=True, tls_context=context,
                          username="agent", password=PASSWORD)
    assert len(tls_sink.messages()) == 1


async def test_a_client_that_does_not_trust_the_certificate_is_stopped(tls_sink: SmtpSink) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await aiosmtplib.send(mail(), hostname=tls_sink.host, port=tls_sink.smtp_port, start_tls=True,
                              username="agent", password=PASSWORD)
    assert tls_sink.messages() == []


async def test_wrong_password_is_refused_with_535(tls_sink: SmtpSink) -> None:
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
        await send_secure(tls_sink, mail(), password="wrong")
    assert refused.value.code == 535
    assert tls_sink.messages() == []


async def test_mail_without_starttls_is_refused_when_the_sink_requires_it(tls_sink: SmtpSink) -> None:
    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await send_plain(tls_sink, mail())
    assert refused.value.code == 530
    assert tls_sink.messages() == []


async def test_rcpt_fault_refuses_the_recipient_once(sink: SmtpSink) -> None:
    sink.add_fault(550, message="5.1.1 mailbox unavailable")

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send_plain(sink, mail())
    [recipient] = refused.value.recipients
    assert (recipient.code, recipient.message) == (550, "5.1.1 mailbox unavailable")
    assert sink.messages() == []

    await send_plain(sink, mail())  # times=1: used up
    assert len(sink.messages()) == 1


async def test_data_fault_answers_the_end_of_data_and_keeps_nothing(sink: SmtpSink) -> None:
    sink.add_fault(451, stage="data", times=2)

    for _ in range(2):
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await send_plain(sink, mail())
        assert refused.value.code == 451
        assert refused.value.message == "4.3.0 Local error in processing"  # a default text per code
    assert sink.messages() == []
    await send_plain(sink, mail())
    assert len(sink.messages()) == 1


async def test_drop_after_data_keeps_the_mail_but_loses_the_reply(tls_sink: SmtpSink) -> None:
    tls_sink.add_fault(0, stage="drop_after_data")

    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await send_secure(tls_sink, mail())
    [received] = tls_sink.messages()
    assert received["message_id"] == "<dlv-1@shop.example>"


async def test_a_delay_without_a_code_answers_rcpt_late_then_normally(sink: SmtpSink) -> None:
    sink.add_fault(stage="rcpt", delay_s=4.0)

    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await aiosmtplib.send(mail(), hostname=sink.host, port=sink.smtp_port, timeout=1.0)
    assert sink.messages() == []
    await send_plain(sink, mail())  # times=1: used up
    assert len(sink.messages()) == 1


async def test_a_delayed_data_keeps_the_mail_while_the_sender_gives_up(sink: SmtpSink) -> None:
    sink.add_fault(stage="data", delay_s=4.0)

    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await aiosmtplib.send(mail(), hostname=sink.host, port=sink.smtp_port, timeout=1.0)
    [kept] = sink.messages()
    assert kept["message_id"] == "<dlv-1@shop.example>"


async def test_a_delayed_failure_answers_its_code_late(sink: SmtpSink) -> None:
    sink.add_fault(451, stage="rcpt", delay_s=0.2)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await send_plain(sink, mail())
    assert refused.value.recipients[0].code == 451


async def test_faults_match_one_recipient_or_one_domain(sink: SmtpSink) -> None:
    sink.add_fault(550, match_rcpt="Blocked@Example.com", times=5)
    sink.add_fault(451, match_rcpt="@greylisted.example", times=5)

    await send_plain(sink, mail(to="other@example.com"))
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as blocked:
        await send_plain(sink, mail(to="blocked@example.com"))
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as greylisted:
        await send_plain(sink, mail(to="anyone@greylisted.example"))

    assert blocked.value.recipients[0].code == 550
    assert greylisted.value.recipients[0].code == 451
    assert [m["rcpt_tos"] for m in sink.messages()] == [["other@example.com"]]


@pytest.mark.parametrize(("fault", "error"), [
    ({"code": 550, "stage": "later"}, "stage must be one of"),
    ({"code": 250}, "code must be an SMTP failure code"),
    ({"code": 550, "times": 0}, "times must be at least 1"),
    ({"code": 550, "message": "two\r\nlines"}, "single line"),
    ({"stage": "rcpt"}, "a fault needs a code"),
    ({"code": 451, "delay_s": -1}, "delay_s must be between"),
    ({"code": 0, "stage": "drop_after_data", "delay_s": 1}, "cannot have a delay"),
])
def test_bad_faults_are_refused(sink: SmtpSink, fault: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sink.add_fault(**fault)
    assert sink.faults() == []


async def test_control_api_over_http(sink: SmtpSink) -> None:
    async with httpx.AsyncClient(base_url=sink.url) as http:
        created = await http.post("/_emulator/faults", json={"code": 552, "stage": "data", "times": 1,
                                                             "match_rcpt": None, "message": "5.3.4 too big"})
        assert created.status_code == 201
        assert (await http.get("/_emulator/faults")).json() == [
            {"code": 552, "times": 1, "stage": "data", "match_rcpt": None, "message": "5.3.4 too big",
             "delay_s": 0.0}]
        bad = await http.post("/_emulator/faults", json={"code": "550"})
        assert bad.status_code == 400 and bad.json()["errors"]

        with pytest.raises(aiosmtplib.SMTPDataError, match="too big"):
            await send_plain(sink, mail())
        await send_plain(sink, mail())
        listed = (await http.get("/_emulator/messages")).json()
        assert [m["subject"] for m in listed] == [SUBJECT]

        assert (await http.post("/_emulator/reset")).status_code == 204
        assert (await http.get("/_emulator/messages")).json() == []


async def test_the_html_page_lists_mail_escaped(sink: SmtpSink) -> None:
    await send_plain(sink, mail(subject="<script>alert('subject')</script> & more"))

    async with httpx.AsyncClient(base_url=sink.url) as http:
        page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;alert(&#x27;subject&#x27;)&lt;/script&gt; &amp; more" in page.text
    assert "<script>" not in page.text
    assert "1 message(s)" in page.text


def test_command_line_runs_the_sink_alone() -> None:
    command = [sys.executable, "-m", "devstack.smtp", "--smtp-port", "0", "--http-port", "0",
               "--starttls", "--auth", "agent:pw"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # printed once both sides listen
            assert line.startswith("smtp listening on http://127.0.0.1:"), line
            url = line.split(" on ", 1)[1].strip()
            assert httpx.get(f"{url}/_emulator/messages", timeout=5).json() == []
        finally:
            process.terminate()
            process.wait(timeout=10)
