"""A small threaded HTTP server on a daemon thread: the codec server and the dev stack's stand-ins.

The standard library's `ThreadingHTTPServer` does the serving; this adds what both need: start/stop
as a context manager, port 0 for a free port, and a client that hangs up logged at debug level rather
than printed as a traceback.
"""

from __future__ import annotations

import logging
import sys
import threading
from abc import ABC, abstractmethod
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

log = logging.getLogger(__name__)


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (a timeout, a browser navigating away) is normal, not a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.debug("client %s went away", client_address)
            return
        log.exception("error serving %s", client_address)


class BackgroundHTTPServer(ABC):
    """Serves `handler_class()` on (host, port) in a daemon thread; port 0 picks a free port."""

    name = "http-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @abstractmethod
    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        """The request handler, built by the subclass around what it serves."""

    def start(self) -> Self:
        self._httpd = _ThreadingServer((self.host, self.port), self.handler_class())
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
