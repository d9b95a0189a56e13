"""The SMTP stand-in: an aiosmtpd server that keeps what it receives, with fault injection.

It plays the tenant's relay (ARCHITECTURE §6): optional STARTTLS with a self-signed certificate made at
start, optional AUTH PLAIN/LOGIN, and faults a test or a developer injects per stage:

- `rcpt`: answer RCPT with the fault's code (the recipient is not added);
- `data`: answer the end of DATA with the fault's code (the message is not kept);
- `drop_after_data`: keep the message, then close the connection before the final reply, the case
  where the sender cannot know whether the mail went through.

A fault with `delay_s` first holds its answer that long (a relay that hangs). A delay without a code
then answers normally: at `rcpt` the recipient is accepted late; at `data` the message is kept at once
and the "250 queued" comes late, so a sender that gives up meanwhile cannot know the mail went through.

The HTTP side (EmulatorServer) serves the control API and a page listing the received mail:
`GET /_emulator/messages`, `GET|POST /_emulator/faults`, `POST /_emulator/reset`, `GET /`.

    python -m devstack.smtp --smtp-port 2525 --http-port 8025 [--starttls] [--auth user:pass]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import html
import ipaddress
import logging
import shutil
import socket
import ssl
import tempfile
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any, Literal, Self, cast, get_args

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devstack.emulator import EmulatorServer, Request, Response, run_cli

log = logging.getLogger(__name__)


class _QuietLoginDataWarning(logging.Filter):
    """aiosmtpd 1.4 logs a deprecation WARNING on every successful AUTH (it sets Session.login_data
    itself); that is its own business, not a problem of the relay being emulated."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_QuietLoginDataWarning())

FaultStage = Literal["rcpt", "data", "drop_after_data"]
FAULT_STAGES: tuple[str, ...] = get_args(FaultStage)

# Reply texts a real relay would give, so traces read like production ones when a fault has no text.
DEFAULT_REPLY_TEXT = {
    421: "4.3.2 Service not available",
    450: "4.2.1 Mailbox busy",
    451: "4.3.0 Local error in processing",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message too big",
    553: "5.1.3 Mailbox name not allowed",
    554: "5.7.1 Transaction failed",
}


@dataclass
class Fault:
    code: int | None  # None: a pure delay, then the normal answer
    times: int
    stage: FaultStage
    match_rcpt: str | None = None
    message: str | None = None
    delay_s: float = 0.0

    @property
    def reply(self) -> str:
        text = self.message or (DEFAULT_REPLY_TEXT.get(self.code) if self.code else None) or "Injected failure"
        return f"{self.code} {text}"

    def matches(self, recipients: list[str]) -> bool:
        """No match_rcpt matches all, `@domain` a domain, anything else one address (case-insensitive)."""
        if self.match_rcpt is None:
            return True
        wanted = self.match_rcpt.lower()
        if wanted.startswith("@"):
            return any(rcpt.lower().endswith(wanted) for rcpt in recipients)
        return any(rcpt.lower() == wanted for rcpt in recipients)


class SmtpSink(EmulatorServer):
    """The SMTP relay stand-in. `port`/`url` are its HTTP side, `smtp_port` its SMTP side."""

    name = "smtp"

    def __init__(self, host: str = "127.0.0.1", smtp_port: int = 0, http_port: int = 0, *,
                 starttls: bool = False, auth: dict[str, str] | None = None) -> None:
        super().__init__(host, http_port)
        self.smtp_port = smtp_port
        self.starttls = starttls
        self.auth = dict(auth) if auth else None
        self.cert_path: Path | None = None
        self._messages: list[dict[str, Any]] = []
        self._faults: list[Fault] = []
        self._tmpdir: Path | None = None
        self._controller: _Controller | None = None
        self.router.add("GET", "/", self._page)
        self.router.add("GET", "/_emulator/messages", lambda _: Response.json(200, self.messages()))
        self.router.add("GET", "/_emulator/faults", lambda _: Response.json(200, self.faults()))
        self.router.add("POST", "/_emulator/faults", self._post_fault)
        self.router.add("POST", "/_emulator/reset", self._post_reset)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        tls_context = self._make_tls_context() if self.starttls else None
        controller = _Controller(
            _Handler(self),
            _bind(self.host, self.smtp_port),
            server_hostname="smtp-sink.localhost",  # skips aiosmtpd's getfqdn() lookup at every connection
            tls_context=tls_context,
            require_starttls=self.starttls,
            auth_required=self.auth is not None,
            # A relay that offers STARTTLS wants AUTH inside it; without TLS the dev sink still takes AUTH.
            auth_require_tls=self.starttls,
            authenticator=self._authenticate if self.auth is not None else None,
        )
        controller.start()
        self._controller = controller
        self.smtp_port = controller.port
        super().start()
        log.info("smtp sink: SMTP on %s:%d%s%s, control API on %s", self.host, self.smtp_port,
                 " (STARTTLS)" if self.starttls else "", " (AUTH)" if self.auth else "", self.url)
        return self

    def stop(self) -> None:
        super().stop()
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _make_tls_context(self) -> ssl.SSLContext:
        self._tmpdir = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.cert_path, key_path = _write_self_signed_cert(self._tmpdir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_path, key_path)
        return context

    # --- what tests and the control API use ------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(message) for message in self._messages]

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(fault) for fault in self._faults]

    def add_fault(self, code: int | None = None, times: int = 1, match_rcpt: str | None = None,
                  stage: str = "rcpt", message: str | None = None, delay_s: float = 0.0) -> None:
        """Answer the next `times` matching transactions at `stage` with `code` (ignored for drops),
        after `delay_s` seconds; with a delay, `code` may be left out for a late normal answer."""
        if stage not in FAULT_STAGES:
            raise ValueError(f"stage must be one of {', '.join(FAULT_STAGES)}, not {stage!r}")
        if not 0 <= delay_s <= 3600:
            raise ValueError(f"delay_s must be between 0 and 3600 seconds, not {delay_s}")
        if stage == "drop_after_data" and delay_s:
            raise ValueError("a drop_after_data fault cannot have a delay: use a delayed data fault")
        if code is None and not (delay_s or stage == "drop_after_data"):
            raise ValueError("a fault needs a code (400-599), a delay_s, or both")
        if stage != "drop_after_data" and code is not None and not 400 <= code <= 599:
            raise ValueError(f"code must be an SMTP failure code (400-599), not {code}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        if message is not None and any(ch in message for ch in "\r\n"):
            raise ValueError("message must be a single line")
        with self._lock:
            self._faults.append(Fault(code, times, cast(FaultStage, stage), match_rcpt, message, delay_s))

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            self._faults.clear()

    # --- what the SMTP handler calls (from the controller's thread) --------------------------------

    def _take_fault(self, stage: FaultStage, recipients: list[str]) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.stage == stage and fault.matches(recipients):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _store(self, envelope: Envelope, session: Session) -> None:
        record = _describe(envelope, session)
        with self._lock:
            self._messages.append(record)

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            if self.auth.get(login) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    # --- HTTP routes ---------------------------------------------------------------------------------

    def _post_fault(self, request: Request) -> Response:
        try:
            body = request.json()
            if not isinstance(body, dict) or not isinstance(body.get("code", 0), int | None):
                raise ValueError('body must be a JSON object; "code", when given, an integer')
            self.add_fault(body.get("code"), times=int(body.get("times", 1)), match_rcpt=body.get("match_rcpt"),
                           stage=str(body.get("stage", "rcpt")), message=body.get("message"),
                           delay_s=float(body.get("delay_s", 0.0)))
        except (TypeError, ValueError) as exc:
            return Response.json(400, {"errors": [str(exc)]})
        return Response.json(201, {"faults": self.faults()})

    def _post_reset(self, _: Request) -> Response:
        self.reset()
        return Response.empty()

    def _page(self, _: Request) -> Response:
        """Newest first; every value is escaped, as mail content is whatever a sender put there."""
        messages = self.messages()
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(value or ''))}</td>" for value in (
                m["received_at"], m["mail_from"], ", ".join(m["rcpt_tos"]), m["message_id"], m["subject"]))
            + f"<td><pre>{html.escape(m['text'] or '')}</pre></td></tr>"
            for m in reversed(messages)
        )
        page = (
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>SMTP sink</title></head><body>"
            f"<h1>SMTP sink: {len(messages)} message(s)</h1><table border=\"1\"><tr><th>received</th>"
            "<th>from</th><th>to</th><th>message id</th><th>subject</th><th>text</th></tr>"
            f"{rows}</table></body></html>"
        )
        return Response(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})


class _Handler:
    """aiosmtpd hooks. Each runs on the controller's event loop; the sink's lock guards shared state."""

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        fault = self.sink._take_fault("rcpt", [address])
        if fault is not None:
            await asyncio.sleep(fault.delay_s)
            if fault.code is not None:
                return fault.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fault = self.sink._take_fault("data", envelope.rcpt_tos)
        if fault is not None and fault.code is not None:
            await asyncio.sleep(fault.delay_s)
            return fault.reply
        self.sink._store(envelope, session)
        if fault is not None:  # kept; the reply is late
            await asyncio.sleep(fault.delay_s)
        if self.sink._take_fault("drop_after_data", envelope.rcpt_tos) is not None:
            # The message is kept, the reply never leaves: closing now makes aiosmtpd's write of the
            # reply below a no-op, and the client sees the connection end after its terminator.
            assert server.transport is not None
            server.transport.close()
        return "250 OK: queued"


class _Controller(Controller):
    """aiosmtpd's Controller on a socket bound beforehand, so port 0 works and the port is known."""

    def __init__(self, handler: _Handler, sock: socket.socket, **kwargs: Any) -> None:
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock

    def _create_server(self) -> Awaitable[Any]:
        return self.loop.create_server(self._factory_invoker, sock=self._sock, ssl=self.ssl_context)


def _bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets whose proto says TCP, and with
    # Nagle on every multi-line reply (EHLO) waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _describe(envelope: Envelope, session: Session) -> dict[str, Any]:
    """The JSON view of one received message, decoded (RFC 2047 headers, transfer encodings, charsets)."""
    # Wire line ends are CRLF; parsed as such they would stay in the decoded text.
    raw = (envelope.original_content or b"").replace(b"\r\n", b"\n")
    message = cast(EmailMessage, BytesParser(policy=default_policy).parsebytes(raw))
    headers: dict[str, str] = {}
    for name, value in message.items():
        headers.setdefault(name, str(value))  # a repeated header keeps its first value
    return {
        "mail_from": envelope.mail_from,
        "rcpt_tos": list(envelope.rcpt_tos),
        "message_id": headers.get("Message-ID"),
        "subject": headers.get("Subject"),
        "headers": headers,
        "text": _body(message, "plain"),
        "html": _body(message, "html"),
        "received_at": dt.datetime.now(dt.UTC).isoformat(),
        "tls": session.ssl is not None,
        "auth_user": session.auth_data if session.authenticated else None,
    }


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.get_content_subtype() != subtype:
        return None
    return cast(str, part.get_content())


def _write_self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A P-256 certificate for localhost and 127.0.0.1, valid for a day; returns (cert, key) PEM paths.

    It is its own CA (basicConstraints CA, keyCertSign, key identifiers) so that a client can trust it
    through `cafile=` with verification on, also under OpenSSL's strict X.509 checks.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, crl_sign=False, encipher_only=False,
            decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "sink-cert.pem", directory / "sink-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smtp-port", type=int, default=2525)
    # The HTTP side; run_cli's --port means the same thing.
    parser.add_argument("--http-port", dest="port", type=int, default=argparse.SUPPRESS)
    parser.add_argument("--starttls", action="store_true", help="offer (and require) STARTTLS")
    parser.add_argument("--auth", action="append", default=[], metavar="USER:PASS",
                        help="require AUTH with these credentials (repeatable)")


def _factory(args: argparse.Namespace) -> SmtpSink:
    auth = dict(item.split(":", 1) for item in args.auth) or None
    sink = SmtpSink(args.host, args.smtp_port, args.port, starttls=args.starttls, auth=auth)
    return sink


if __name__ == "__main__":
    run_cli("SMTP relay stand-in with a JSON view of received mail", _factory, _configure, default_port=8025)
