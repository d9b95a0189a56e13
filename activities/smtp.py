"""`smtp_send`: one SMTP attempt to deliver one reply through the tenant's relay (aiosmtplib).

The workflow runs this activity with `maximum_attempts=1` and loops itself, so one call is one attempt
and every error leaves as a taxonomy `ApplicationError` (delivery/failures.py) with a short sentence
for the trace. SMTP is at-least-once: when the connection is lost after the message went out, the
outcome is `ambiguous`, the workflow sends again, and the stable `Message-ID`
`<delivery_id@sender-domain>` lets the receiver recognise the duplicate (ARCHITECTURE §4).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr

import aiosmtplib
from aiosmtplib import SMTPDataError, SMTPResponse, SMTPResponseException, SMTPServerDisconnected, SMTPStatus
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import while_heartbeating
from delivery.failures import ambiguous, permanent, transient
from delivery.models import NO_REPLY_LOCAL_PARTS, SmtpSendInput, SmtpSendResult
from delivery.settings import SmtpSettings

# Bodies go out as quoted-printable or base64 whenever they are not plain ASCII, so the message is
# 7-bit clean and no relay has to offer 8BITMIME; headers are RFC 2047-encoded by the same policy.
MESSAGE_POLICY = SMTP_POLICY.clone(cte_type="7bit")

# Replies that mean "the relay does not accept our login" (RFC 4954): fixed by configuration, not time.
AUTH_REPLY_CODES = frozenset({530, 534, 535})

# Reply code -> failure, first match wins. Any 4xx/5xx reply is the relay's final word on the attempt,
# also after DATA: it answered, so the outcome is known.
REPLY_CLASSES: tuple[tuple[Callable[[int], bool], Callable[[str], ApplicationError]], ...] = (
    (AUTH_REPLY_CODES.__contains__, lambda text: permanent(text, "configuration")),
    (lambda code: 400 <= code <= 499, transient),
    (lambda code: 500 <= code <= 599, lambda text: permanent(text, "rejected")),
)


class SmtpActivities:
    """Holds the SMTP settings (global relay and per-tenant overrides); a connection per attempt."""

    def __init__(self, settings: SmtpSettings) -> None:
        self.settings = settings

    @activity.defn
    async def smtp_send(self, input: SmtpSendInput) -> SmtpSendResult:
        relay = self.settings.for_tenant(input.tenant_id)
        message = build_message(input, input.from_address or relay.from_address, datetime.now(UTC))
        reply = await _send(relay, message)
        return SmtpSendResult(message_id=str(message["Message-ID"]), server_reply=reply)


def build_message(input: SmtpSendInput, from_address: str, now: datetime) -> EmailMessage:
    """The reply as an email; refuses (permanent `invalid_input`) what must not be sent.

    `from_address` is `addr` or `Display Name <addr>`; `now` must be timezone-aware.
    """
    _refuse_header_injection({
        "delivery id": input.delivery_id, "to": input.to, "from": from_address, "subject": input.subject,
        "in-reply-to": input.in_reply_to or "",
    })
    sender = _mailbox(from_address, "sender")
    recipient = _mailbox(input.to, "recipient")
    if recipient.username.lower() in NO_REPLY_LOCAL_PARTS:
        raise permanent(f"{recipient.addr_spec} is a no-reply address: a reply sent there is discarded",
                        "invalid_input")

    message = EmailMessage(policy=MESSAGE_POLICY)
    message["Message-ID"] = _message_id(input.delivery_id, sender)
    message["Date"] = format_datetime(now)
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = input.subject
    if input.in_reply_to:
        message["In-Reply-To"] = input.in_reply_to
        message["References"] = input.in_reply_to
    message.set_content(input.body_text, charset="utf-8")
    if input.body_html is not None:
        message.add_alternative(input.body_html, subtype="html", charset="utf-8")
    return message


def _message_id(delivery_id: str, sender: Address) -> str:
    """The same for every attempt of a delivery, so receivers can drop a duplicate."""
    return f"<{delivery_id}@{sender.domain.lower()}>"


def _refuse_header_injection(values: dict[str, str]) -> None:
    """Header values with CR, LF or NUL are refused, never stripped (ARCHITECTURE §5)."""
    for name, value in values.items():
        if any(ch in value for ch in "\r\n\0"):
            raise permanent(f"the {name} contains a line break or NUL character: refused as header injection",
                            "invalid_input")


def _mailbox(value: str, role: str) -> Address:
    """`addr` or `Display Name <addr>` as an Address; refused (permanent `invalid_input`) if it is neither."""
    display_name, addr_spec = parseaddr(value)
    local, at, domain = addr_spec.rpartition("@")
    try:
        if local and at and domain:
            return Address(display_name=display_name, username=local, domain=domain)
    except ValueError:
        pass
    raise permanent(f"the {role} {value!r} is not an email address", "invalid_input")


async def _send(relay: SmtpSettings, message: EmailMessage) -> str:
    """One SMTP transaction; returns the relay's final reply, or raises a taxonomy error."""
    client = aiosmtplib.SMTP(
        hostname=relay.host, port=relay.port, timeout=relay.timeout_s,
        use_tls=relay.security == "tls", start_tls=False,  # STARTTLS is done below, as its own step
        validate_certs=relay.validate_certs, cert_bundle=relay.ca_file,
    )
    transaction = _Transaction(client, relay)
    try:
        reply = await while_heartbeating(transaction.run(message), lambda: transaction.current_step)
    except ApplicationError:
        raise
    except asyncio.CancelledError:
        if transaction.after_data:
            # Cancelled (an operator action, a cancelled delivery) with the message already sent:
            # say so, rather than let the attempt look as if nothing went out.
            raise ambiguous("SMTP attempt cancelled after the message was sent; the relay may have "
                            "accepted it") from None
        raise
    except Exception as exc:
        # `from None`: aiosmtplib's exceptions carry the recipient; they must not reach logs or history.
        raise classify_smtp_error(exc, after_data=transaction.after_data) from None
    finally:
        client.close()
    return f"{reply.code} {reply.message}"


class _Transaction:
    """The SMTP steps one by one, heartbeating at each, remembering whether the message went out."""

    def __init__(self, client: aiosmtplib.SMTP, relay: SmtpSettings) -> None:
        self.client = client
        self.relay = relay
        self.after_data = False
        self.current_step = "connect"

    def step(self, name: str) -> None:
        self.current_step = name
        activity.heartbeat(name)

    async def run(self, message: EmailMessage) -> SMTPResponse:
        client, relay = self.client, self.relay
        self.step("connect")
        await client.connect()
        self.step("ehlo")
        await client.ehlo()
        if relay.security == "starttls":
            self.require_extension("starttls", "STARTTLS, and mail is never sent in clear text instead")
            self.step("starttls")
            await client.starttls()
            await client.ehlo()  # RFC 3207: what the server said before TLS no longer counts
        if relay.username:
            self.require_extension("auth", "AUTH, but a username is configured")
            self.step("auth")
            password = relay.password.get_secret_value() if relay.password else ""
            await client.login(relay.username, password)
        sender, recipient = (str(message[name].addresses[0].addr_spec) for name in ("From", "To"))
        # An address with non-ASCII characters can only travel with SMTPUTF8 (RFC 6531).
        utf8 = not (sender + recipient).isascii()
        if utf8:
            self.require_extension("smtputf8", "SMTPUTF8, needed for a non-ASCII address", reason="rejected")
        encoding = "utf-8" if utf8 else "ascii"
        self.step("mail")
        await client.mail(sender, options=["SMTPUTF8"] if utf8 else [], encoding=encoding)
        self.step("rcpt")
        await client.rcpt(recipient, encoding=encoding)
        self.step("data")
        reply = await self.data(message.as_bytes(policy=MESSAGE_POLICY.clone(utf8=utf8)))
        self.step("quit")
        with suppress(aiosmtplib.SMTPException, OSError):  # the relay has the mail: QUIT is a courtesy
            await client.quit()
        return reply

    def require_extension(self, extension: str, what: str, reason: str = "configuration") -> None:
        if not self.client.supports_extension(extension):
            relay = f"{self.relay.host}:{self.relay.port}"
            raise permanent(f"the SMTP relay {relay} does not offer {what}", reason)

    async def data(self, payload: bytes) -> SMTPResponse:
        """DATA in two halves, because aiosmtplib's `data()` does both in one call and a lost connection
        raised from it could mean "never sent" (safe to retry) or "sent, reply lost" (ambiguous)."""
        start = await self.client.execute_command(b"DATA")
        if start.code != SMTPStatus.start_input:
            raise SMTPDataError(start.code, start.message)
        protocol = self.client.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost before the message was sent")
        protocol.write(_data_block(payload))
        # write() returned: the message and its terminator are on their way; a lost reply from here on
        # leaves the relay possibly holding the mail.
        self.after_data = True
        reply = await protocol.read_response(timeout=self.client.timeout)
        if reply.code != SMTPStatus.completed:
            raise SMTPDataError(reply.code, reply.message)
        return reply


def _data_block(payload: bytes) -> bytes:
    """The message as DATA content: CRLF line ends, leading dots doubled, the terminator (RFC 5321 §4.5.2)."""
    lines = payload.splitlines()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def classify_smtp_error(exc: BaseException, *, after_data: bool) -> ApplicationError:
    """The taxonomy failure for an SMTP error; `after_data` says the message had been sent in full."""
    if isinstance(exc, SMTPResponseException):
        text = _reply_text(exc.code, exc.message)
        for matches, failure in REPLY_CLASSES:
            if matches(exc.code):
                return failure(text)
    certificate_problem = _certificate_error(exc)
    if certificate_problem is not None:
        # Permanent "configuration", not transient: the same handshake with the same trust settings fails
        # the same way on every retry, like a refused login (535). It needs an operator (trust the
        # relay's CA with OUTBOUND_SMTP_CA_FILE, or fix the host name), who then asks for a `retry`.
        return permanent(f"the SMTP relay's TLS certificate could not be verified ({certificate_problem}); "
                         "trust its CA with OUTBOUND_SMTP_CA_FILE or check the host name", "configuration")
    cause = _describe(exc)
    if after_data:
        return ambiguous(f"connection lost after the message was sent, before the relay confirmed it "
                         f"({cause}): the receiver may have the mail")
    return transient(f"SMTP attempt failed before the message was sent: {cause}")


_ADDRESS = re.compile(r"<?[^\s<>()\[\]@\"',;:]+@[^\s<>()\[\]@\"',;:]+>?")  # with its <>, if any


def redact_addresses(text: str) -> str:
    """Relays quote the recipient (`550 5.1.1 <jane@example.org>: Recipient address rejected`): the address
    is personal data and must not reach the trace row or the logs."""
    return _ADDRESS.sub("<address>", text)


def _reply_text(code: int, message: str) -> str:
    """`SMTP 550 5.1.1 <address>: ...`, on one line (multi-line replies are joined), addresses redacted."""
    return redact_addresses(" ".join(f"SMTP {code} {message}".split()))


def _certificate_error(exc: BaseException) -> str | None:
    """The verification failure behind `exc`, if any (aiosmtplib wraps it when connecting with TLS)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLCertVerificationError):
            return current.verify_message or str(current)
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _describe(exc: BaseException) -> str:
    return redact_addresses(" ".join(str(exc).split())) or type(exc).__name__
