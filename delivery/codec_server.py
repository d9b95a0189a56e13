"""python -m delivery.codec_server: Temporal's remote codec protocol over our payload codec, for the Web UI and CLI.

`POST /encode` and `POST /decode` (also `/{namespace}/encode|decode`) take and return proto3 JSON
`{"payloads": [...]}`. Every POST needs `Authorization: Bearer <OUTBOUND_CODEC_SERVER_TOKEN>` or the
session cookie set by `POST /login` (401 otherwise). Browsers may call it only from the configured UI
origin (`OUTBOUND_CODEC_UI_ORIGIN`): the CORS preflight is answered for that origin alone (with
credentials allowed, so the UI's "include cross-origin credentials" fetch carries the cookie), and a
request carrying any other `Origin` is refused (403).

`GET /login` is a small form; `POST /login` (form field `token`, compared in constant time) sets an
HttpOnly, SameSite=Lax cookie whose value is an HMAC of a fixed label under the token: stateless, and
void once the token changes. `POST /logout` clears it. Nothing of a payload is ever logged. A threaded
stdlib server, like the dev stand-ins.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from google.protobuf import json_format
from pydantic import ValidationError
from temporalio.api.common.v1 import Payloads

from delivery.background_http import BackgroundHTTPServer
from delivery.codec import EncryptionCodec, PayloadDecryptionError
from delivery.settings import CodecSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
# Temporal refuses payloads over 2 MB; a UI or CLI request carries a few of them.
MAX_BODY_BYTES = 16 * 1024 * 1024
ALLOWED_HEADERS = "content-type,x-namespace,authorization"
MAX_LOGIN_BYTES = 4096
SESSION_COOKIE = "temporal_codec_session"
_SESSION_LABEL = b"outbound codec server: browser session v1"
# The login pages: no script, no framing, forms post only back here, nothing cached. `same-origin`, not
# `no-referrer`: under the latter Chromium posts the form with `Origin: null`, which the CSRF check refuses.
_PAGE_HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
                 "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                            "frame-ancestors 'none'"}
_ROUTE = re.compile(r"^(?:/(?P<namespace>[A-Za-z0-9][A-Za-z0-9._-]{0,254}))?/(?P<operation>encode|decode)/?$")


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    html: str | None = None  # a page instead of a JSON body (the login form)

    @property
    def content_type(self) -> str:
        return "text/html; charset=utf-8" if self.html is not None else "application/json"

    def encoded(self) -> bytes:
        if self.html is not None:
            return self.html.encode()
        return json.dumps(self.body).encode() if self.body is not None else b""


class CodecService:
    """The protocol, independent of the HTTP plumbing: one request in, one `Answer` out."""

    def __init__(self, codec: EncryptionCodec, token: str, ui_origin: str) -> None:
        if not token:
            raise ValueError("the codec server needs a bearer token (OUTBOUND_CODEC_SERVER_TOKEN)")
        self.codec = codec
        self._token = token.encode()
        self._session = hmac.new(self._token, _SESSION_LABEL, hashlib.sha256).hexdigest()
        self.ui_origin = ui_origin

    @classmethod
    def from_settings(cls, settings: CodecSettings) -> CodecService:
        if not settings.enabled:
            raise ValueError("no encryption keys configured: set OUTBOUND_CODEC_KEYS (docs/SECURITY.md)")
        if settings.server_token is None or not settings.server_token.get_secret_value():
            raise ValueError("no bearer token configured: set OUTBOUND_CODEC_SERVER_TOKEN (docs/SECURITY.md)")
        return cls(EncryptionCodec.from_settings(settings), settings.server_token.get_secret_value(),
                   settings.ui_origin)

    def answer(self, method: str, path: str, headers: dict[str, str], read_body: Any) -> Answer:
        """`headers` have lower-case names; `read_body(limit)` reads the body once it is allowed."""
        if path.rstrip("/") in ("/login", "/logout"):
            return self._login(method, path.rstrip("/"), headers, read_body)
        route = _ROUTE.match(path)
        if route is None:
            return Answer(404, {"message": f"no route {path}; use /encode or /decode"})
        origin = headers.get("origin")
        if origin is not None and origin != self.ui_origin:
            log.warning("codec server: refused a request from origin %r", origin)
            return Answer(403, {"message": "origin not allowed"})
        cors = self._cors(origin)
        if method == "OPTIONS":
            if origin is None:
                return Answer(403, {"message": "a CORS preflight needs an Origin"})
            return Answer(204, None, {**cors, "Access-Control-Allow-Methods": "POST",
                                      "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                                      "Access-Control-Max-Age": "600"})
        if method != "POST":
            return Answer(405, {"message": f"{method} not allowed; POST"}, {**cors, "Allow": "POST, OPTIONS"})
        if not (self._authorized(headers.get("authorization", "")) or self._has_session(headers)):
            return Answer(401, {"message": "a valid `Authorization: Bearer <token>` (or a session from /login) "
                                           "is required"},
                          {**cors, "WWW-Authenticate": 'Bearer realm="temporal-codec"'})
        length = headers.get("content-length", "")
        if not length.isdigit():
            return Answer(411, {"message": "Content-Length is required"}, cors)
        if int(length) > MAX_BODY_BYTES:
            return Answer(413, {"message": f"body over {MAX_BODY_BYTES} bytes"}, cors)
        try:
            payloads = json_format.Parse(read_body(int(length)), Payloads(), ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as err:
            return Answer(400, {"message": f"body is not proto3 JSON {{\"payloads\": [...]}}: {err}"}, cors)
        try:
            if route["operation"] == "encode":
                result = self.codec.encrypt(payloads.payloads)
            else:
                result = self.codec.decrypt(payloads.payloads)
        except PayloadDecryptionError as err:  # names a key id, never payload content
            return Answer(400, {"message": str(err)}, cors)
        body = json_format.MessageToDict(Payloads(payloads=result))
        return Answer(200, {"payloads": body.get("payloads", [])}, cors)

    def _authorized(self, header: str) -> bool:
        scheme, _, presented = header.strip().partition(" ")
        # Compared in constant time; a wrong scheme still costs the comparison.
        matches = hmac.compare_digest(presented.strip().encode(), self._token)
        return scheme.lower() == "bearer" and matches

    def _has_session(self, headers: dict[str, str]) -> bool:
        try:
            cookies = SimpleCookie(headers.get("cookie", ""))
        except CookieError:
            return False
        morsel = cookies.get(SESSION_COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self._session.encode())

    def _cors(self, origin: str | None) -> dict[str, str]:
        # Only ever the one configured UI origin (others are refused before this), never `*`.
        if origin is None:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}

    # --- the browser login ------------------------------------------------------------------------

    def _cookie(self, value: str, max_age: int | None = None) -> str:
        attributes = [f"{SESSION_COOKIE}={value}", "Path=/", "HttpOnly", "SameSite=Lax"]
        if self.ui_origin.startswith("https://"):
            attributes.append("Secure")
        if max_age is not None:
            attributes.append(f"Max-Age={max_age}")
        return "; ".join(attributes)

    def _login(self, method: str, path: str, headers: dict[str, str], read_body: Any) -> Answer:
        if method == "GET" and path == "/login":
            return self._page(200, signed_in=self._has_session(headers))
        if method != "POST":
            allowed = "GET, POST" if path == "/login" else "POST"
            return Answer(405, {"message": f"{method} not allowed; {allowed}"}, {"Allow": allowed})
        # A form posted from another site must not sign a browser in or out (login CSRF).
        origin = headers.get("origin")
        if origin is not None and origin != self.ui_origin and urlsplit(origin).netloc != headers.get("host"):
            log.warning("codec server: refused a %s from origin %r", path, origin)
            return Answer(403, {"message": "origin not allowed"})
        if path == "/logout":
            return self._page(200, signed_in=False, note="Signed out.",
                              headers={"Set-Cookie": self._cookie("", max_age=0)})
        length = headers.get("content-length", "")
        if not length.isdigit():
            return Answer(411, {"message": "Content-Length is required"})
        if int(length) > MAX_LOGIN_BYTES:
            return Answer(413, {"message": f"body over {MAX_LOGIN_BYTES} bytes"})
        try:
            form = parse_qs(read_body(int(length)).decode(), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            form = {}
        presented = (form.get("token") or [""])[0].strip().encode()
        if not hmac.compare_digest(presented, self._token):
            log.warning("codec server: a login with a wrong token")
            return self._page(401, signed_in=False, note="Wrong token.")
        log.info("codec server: a browser signed in")
        return self._page(200, signed_in=True, note="Signed in.",
                          headers={"Set-Cookie": self._cookie(self._session)})

    def _page(self, status: int, signed_in: bool, note: str = "", headers: dict[str, str] | None = None) -> Answer:
        ui = html.escape(self.ui_origin)
        if signed_in:
            form = (f"<p>This browser may read decoded payloads in the Temporal Web UI at <a href=\"{ui}\">{ui}</a> "
                    "(its codec settings need <em>Include cross-origin credentials</em> on).</p>"
                    '<form method="post" action="/logout"><button type="submit">Sign out</button></form>')
        else:
            form = ('<form method="post" action="/login"><label>Codec server token '
                    '<input type="password" name="token" autocomplete="current-password" autofocus required>'
                    '</label> <button type="submit">Sign in</button></form>')
        notice = f"<p><strong>{html.escape(note)}</strong></p>" if note else ""
        page = ("<!doctype html><html><head><meta charset=\"utf-8\"><title>Codec server sign-in</title></head>"
                "<body style=\"font-family: sans-serif; margin: 2em\"><h1>Temporal codec server</h1>"
                f"{notice}{form}</body></html>")
        return Answer(status, None, {**_PAGE_HEADERS, **(headers or {})}, html=page)


class CodecServer(BackgroundHTTPServer):
    """The codec service on a threaded HTTP server in a daemon thread (port 0: a free port)."""

    name = "codec-server"

    def __init__(self, service: CodecService, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        super().__init__(host, port)
        self.service = service

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        service = self.service

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            timeout = 30  # seconds a client may take to send its request

            def _serve(self) -> None:
                headers = {name.lower(): value for name, value in self.headers.items()}

                def read_body(length: int) -> bytes:
                    return self.rfile.read(length)

                answer = service.answer(self.command, urlsplit(self.path).path, headers, read_body)
                if answer.status not in (200, 204):
                    self.close_connection = True  # an unread body must not be taken for the next request
                body = answer.encoded()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if body:
                    self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

            def log_message(self, format: str, *args: Any) -> None:
                log.info("codec server: " + format, *args)  # the request line and status, never a body

        return _Handler


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m delivery.codec_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        service = CodecService.from_settings(CodecSettings())
    except (ValueError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    try:
        server = CodecServer(service, args.host, args.port).start()
    except OSError as err:  # a port in use is the usual cause: say which, not a traceback
        print(f"error: cannot listen on {args.host}:{args.port} ({err.strerror or err})", file=sys.stderr)
        return 2
    print(f"codec server listening on {server.url} (UI origin {service.ui_origin}, key ids "
          f"{', '.join(service.codec.key_ids)}; encrypting with {service.codec.encrypt_key_id})", flush=True)
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
