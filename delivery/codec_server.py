"""python -m delivery.codec_server: Temporal's remote codec protocol over our payload codec, for the Web UI and CLI.

`POST /encode` and `POST /decode` (also `/{namespace}/encode|decode`) take and return proto3 JSON
`{"payloads": [...]}`. Every POST needs `Authorization: Bearer <OUTBOUND_CODEC_SERVER_TOKEN>` (401
otherwise). Browsers may call it only from the configured UI origin (`OUTBOUND_CODEC_UI_ORIGIN`): the
CORS preflight is answered for that origin alone, and a request carrying any other `Origin` is refused
(403). Nothing of a payload is ever logged. A threaded stdlib server, like the dev stand-ins.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from google.protobuf import json_format
from pydantic import ValidationError
from temporalio.api.common.v1 import Payloads

from delivery.codec import EncryptionCodec, PayloadDecryptionError
from delivery.settings import CodecSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
# Temporal refuses payloads over 2 MB; a UI or CLI request carries a few of them.
MAX_BODY_BYTES = 16 * 1024 * 1024
ALLOWED_HEADERS = "content-type,x-namespace,authorization"
_ROUTE = re.compile(r"^(?:/(?P<namespace>[A-Za-z0-9][A-Za-z0-9._-]{0,254}))?/(?P<operation>encode|decode)/?$")


@dataclass
class Answer:
    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        return json.dumps(self.body).encode() if self.body is not None else b""


class CodecService:
    """The protocol, independent of the HTTP plumbing: one request in, one `Answer` out."""

    def __init__(self, codec: EncryptionCodec, token: str, ui_origin: str) -> None:
        if not token:
            raise ValueError("the codec server needs a bearer token (OUTBOUND_CODEC_SERVER_TOKEN)")
        self.codec = codec
        self._token = token.encode()
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
        if not self._authorized(headers.get("authorization", "")):
            return Answer(401, {"message": "a valid `Authorization: Bearer <token>` is required"},
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

    def _cors(self, origin: str | None) -> dict[str, str]:
        if origin is None:
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


class CodecServer:
    """The codec service on a threaded HTTP server in a daemon thread (port 0: a free port)."""

    name = "codec-server"

    def __init__(self, service: CodecService, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.service = service
        self.host = host
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
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
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

            def log_message(self, format: str, *args: Any) -> None:
                log.info("codec server: " + format, *args)  # the request line and status, never a body

        self._httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name=self.name, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
    server = CodecServer(service, args.host, args.port).start()
    print(f"codec server listening on {server.url} (UI origin {service.ui_origin}, key ids "
          f"{', '.join(service.codec.key_ids)}; encrypting with {service.codec.encrypt_key_id})", flush=True)
    stopped.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
