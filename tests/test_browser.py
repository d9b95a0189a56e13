"""The Temporal Web UI shows what happened to a delivery: a real browser on `make run`'s stack.

`python -m devstack up --detach` starts the dev stack and sends the demo deliveries; headless Chromium,
driven over its DevTools protocol (no WebDriver, nothing downloaded), opens the Web UI, finds the demo
delivery that fell back from SP-API to SMTP through the search attributes, opens it and reads its
timeline. A screenshot of that page is written (docs/img/web-ui-delivery.png, see `SCREENSHOT`).
Chromium comes from Debian (`apt-get install chromium`); without it the test is skipped, saying so.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import detached_devstack

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "img" / "web-ui-delivery.png"
# The committed screenshot is rewritten only on request (or when missing), so `make test` leaves the
# work tree clean: OUTBOUND_UPDATE_SCREENSHOTS=1 make test. Every run writes its own under tmp_path.
UPDATE_SCREENSHOTS = os.environ.get("OUTBOUND_UPDATE_SCREENSHOTS") == "1"

# The demo delivery to find (devstack/demo.py): an Amazon order that allows no message type, so SP-API
# refuses it and the reply goes to the buyer's relay address by SMTP.
FALLBACK_QUERY = ('DeliveryStatus="delivered" AND DeliveryProvider="SMTP_FALLBACK" '
                  'AND AmazonOrderId="402-2222222-2222222"')
# Timeline rows are "<activity type> • <summary>" (the workflow gives every activity a summary).
SPAPI_ROW = "spapi_send • SP-API message for order 402-2222222-2222222"
SMTP_ROW = "smtp_send • SMTP to Amazon relay"

CHROMIUM_FLAGS = [  # as root, on a machine without outside network (see the python-svc machine notes)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1440,1400",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or next(
        (path for path in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if os.access(path, os.X_OK)), None)


def browser_test_marks(timeout_s: int) -> list[pytest.MarkDecorator]:
    """Marks of a test that drives Chromium: skipped, saying why, where Chromium is not installed."""
    return [
        pytest.mark.browser,
        pytest.mark.timeout(timeout_s),
        pytest.mark.skipif(chromium_binary() is None, reason="Chromium is not installed (Debian: apt-get install "
                                                             "chromium; .ci/run does it as root)"),
    ]


pytestmark = browser_test_marks(150)


@pytest.fixture
def devstack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`python -m devstack up --detach` (with its demo deliveries) on free ports; `down` afterwards."""
    with detached_devstack(tmp_path / "devstack", timeout=120) as stack:
        assert "=== 3. Amazon order that allows no message type" in stack.up.stdout, "the demo deliveries were not sent"
        yield stack.state


class Page:
    """One browser tab over the Chrome DevTools Protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        await self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events arrive in between; this client reads one call at a time
            message = json.loads(await self.ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, what: str, within: float = 30.0) -> Any:
        deadline = time.monotonic() + within
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = await self.evaluate("document.body ? document.body.innerText : ''")
                raise AssertionError(f"the Web UI did not show {what} within {within:.0f}s; page text:\n{text[:3000]}")
            await asyncio.sleep(0.25)

    async def wait_until_still(self, expression: str, what: str, within: float = 10.0) -> None:
        """Until `expression` gives the same value twice, half a second apart (an animation has ended)."""
        deadline = time.monotonic() + within
        last = await self.evaluate(expression)
        while True:
            await asyncio.sleep(0.5)
            now = await self.evaluate(expression)
            if now == last and now is not None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} kept moving for {within:.0f}s ({last} -> {now})")
            last = now

    async def screenshot(self) -> bytes:
        """What the window shows (the window is as tall as the delivery page)."""
        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


@asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    binary = chromium_binary()
    assert binary
    log = (profile.parent / "chromium.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
        stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.returncode is None, f"Chromium exited ({process.returncode}); see {log.name}"
            assert time.monotonic() < deadline, f"Chromium opened no DevTools port; see {log.name}"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        tab = next(target for target in targets if target["type"] == "page")
        async with connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            yield page
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", "not a PNG"
    width, height = struct.unpack(">II", png[16:24])
    return width, height


async def test_web_ui_shows_the_sp_api_attempt_and_the_smtp_fallback(devstack: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    ui = devstack["urls"]["web_ui"]  # http://127.0.0.1:<port>/namespaces/default/workflows
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with chromium(profile) as page:
        # The list, filtered by the delivery search attributes the workflow upserts.
        await page.call("Page.navigate", url=f"{ui}?query={quote(FALLBACK_QUERY)}")
        links = await page.wait_for(
            "[...document.querySelectorAll('a[href*=\"/workflows/demo-\"]')].map(a => a.getAttribute('href'))",
            "the demo delivery that fell back to SMTP")
        delivery_ids = {link.split("/workflows/")[1].split("/")[0] for link in links}
        assert len(delivery_ids) == 1, f"the query should find exactly one demo delivery, found {delivery_ids}"
        (delivery_id,) = delivery_ids

        # Its page: the timeline has one row per activity, named by type and summary.
        await page.evaluate(f"document.querySelector('a[href*=\"/workflows/{delivery_id}/\"]').click()")
        await page.wait_for(f"location.pathname.includes('/workflows/{delivery_id}/')", "the delivery's page")
        await page.wait_for(f"document.body.innerText.includes({json.dumps(SPAPI_ROW)})", "the spapi_send step")
        await page.wait_for(f"document.body.innerText.includes({json.dumps(SMTP_ROW)})", "the smtp_send step")
        text = await page.evaluate("document.body.innerText")
        assert '"status": "delivered"' in text and '"provider_final": "SMTP_FALLBACK"' in text  # the result
        # The timeline lays itself out in steps: take the picture once its rows stand still.
        await page.wait_until_still(
            "JSON.stringify([...document.querySelectorAll('svg text')].filter(t => t.textContent.includes('_send'))"
            ".map(t => { const r = t.getBoundingClientRect(); return [t.textContent, Math.round(r.x), r.y | 0]; }))",
            "the timeline")
        png = await page.screenshot()

        # The event history tab lists the same activities by type.
        await page.evaluate(
            "[...document.querySelectorAll('a, button')].find(e => e.innerText.trim().startsWith('Event History'))"
            ".click()")
        await page.wait_for("location.pathname.endsWith('/history')", "the event history")
        await page.wait_for("document.body.innerText.includes('spapi_send') && "
                            "document.body.innerText.includes('smtp_send') && "
                            "/Activity\\s*Task\\s*Scheduled/i.test(document.body.innerText)",
                            "the activities in the event history")

    width, height = png_size(png)
    assert width >= 1200 and height >= 900, f"screenshot of {width}x{height}"
    (tmp_path / SCREENSHOT.name).write_bytes(png)
    if UPDATE_SCREENSHOTS or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
