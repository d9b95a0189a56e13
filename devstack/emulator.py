"""The HTTP plumbing every stand-in shares: a threaded server with JSON routes and a control API.

Stand-ins run in a background thread so that one object serves a pytest fixture, the dev stack and
`python -m devstack.<name> --port N` alike, without touching the caller's event loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from delivery.background_http import BackgroundHTTPServer

log = logging.getLogger(__name__)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    params: dict[str, str] = field(default_factory=dict)  # filled from the route pattern

    def json(self) -> Any:
        """The body as JSON; raises ValueError with a readable message when it is not."""
        if not self.body:
            raise ValueError("request body is empty")
        try:
            return json.loads(self.body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"request body is not JSON: {exc}") from exc


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering (a lost response)

    @classmethod
    def json(cls, status: int, payload: Any, content_type: str = "application/json", **headers: str) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": content_type, **headers})

    @classmethod
    def empty(cls, status: int = 204, **headers: str) -> Response:
        return cls(status, b"", headers)

    @classmethod
    def dropped(cls) -> Response:
        return cls(0, drop=True)


Handler = Callable[[Request], Response]


def control_endpoint(action: Callable[[Request], Any]) -> Handler:
    """A `/_emulator/...` endpoint: 204 when done, 400 with the reason when the request is wrong."""

    def handler(request: Request) -> Response:
        try:
            action(request)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            return Response.json(400, {"errors": [f"bad control request: {type(exc).__name__}: {exc}"]})
        return Response.empty(204)

    return handler


class Router:
    """Routes `METHOD /path/{param}` patterns to handlers, first match wins."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        regex = "^" + re.sub(r"\{(\w+)(?::([^}]+))?\}", lambda m: f"(?P<{m[1]}>{m[2] or '[^/]+'})", pattern) + "$"
        self._routes.append((method.upper(), re.compile(regex), handler))

    def dispatch(self, request: Request) -> Response:
        path_matched = False
        for method, regex, handler in self._routes:
            match = regex.match(request.path)
            if not match:
                continue
            path_matched = True
            if method not in (request.method, "*"):
                continue
            request.params = match.groupdict()
            return handler(request)
        if path_matched:
            return Response.json(405, {"errors": [f"method {request.method} not allowed on {request.path}"]})
        return Response.json(404, {"errors": [f"no route for {request.method} {request.path}"]})


class EmulatorServer(BackgroundHTTPServer):
    """A stand-in HTTP server on 127.0.0.1 in a daemon thread. Subclasses fill `self.router`."""

    name = "emulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.router = Router()
        self._lock = threading.RLock()  # guards the stand-in's state across request threads

    def handle(self, request: Request) -> Response:
        with self._lock:
            return self.router.dispatch(request)

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body are separate writes: without TCP_NODELAY each answer waits ~40 ms for
            # the peer's delayed ACK.
            disable_nagle_algorithm = True

            def _serve(self) -> None:
                split = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Request(
                    method=self.command,
                    path=split.path,
                    query=parse_qs(split.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                try:
                    response = server.handle(request)
                except Exception as exc:  # a stand-in bug must show as a 500, not hang the client
                    log.exception("%s: handler failed", server.name)
                    response = Response.json(500, {"errors": [f"stand-in error: {exc}"]})
                if response.drop:
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                if response.body and self.command != "HEAD":
                    self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_LIST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s: " + format, server.name, *args)

        return _Handler


def run_cli(description: str, factory: Callable[[argparse.Namespace], Any],
            configure: Callable[[argparse.ArgumentParser], None] | None = None, default_port: int = 0) -> None:
    """`python -m devstack.<name> --port N`: start a stand-in and serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port)
    if configure:
        configure(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    server = factory(args)
    try:
        server.start()
    except OSError as err:  # a port in use is the usual cause: say which, not a traceback
        parser.exit(1, f"{server.name}: cannot listen ({err.strerror or err}); check the ports given: "
                       f"{' '.join(f'{k}={v}' for k, v in vars(args).items() if k.endswith('port'))}\n")
    print(f"{server.name} listening on {server.url}", flush=True)
    stopped.wait()
    server.stop()
