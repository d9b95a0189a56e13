"""With encryption on, a person signed in at the codec server reads decoded payloads in the Web UI.

`python -m devstack up --detach --no-demo` with OUTBOUND_CODEC_KEYS and a codec token; one delivery is
sent with `starter.py send` (encrypting). Headless Chromium (driven over the DevTools protocol, as in
tests/test_browser.py) turns on the UI's "Include cross-origin credentials" codec setting the way a
person does (the codec-server icon in the top bar, "Use my browser setting", the endpoint, the box,
Apply), opens the delivery: ciphertext only. It signs in at the codec server's /login form: the same
page shows the reply body. It signs out: ciphertext again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import detached_devstack
from tests.test_browser import Page, browser_test_marks, chromium

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "browser-codec-token-" + base64.urlsafe_b64encode(os.urandom(12)).decode()
BODY = "Your replacement kettle ships on Monday, tracking number KETTLE-7731."

pytestmark = browser_test_marks(60)


@pytest.fixture
def encrypted_devstack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The dev stack with payload encryption and a known codec token, on free ports; one delivery sent."""
    keys = json.dumps({"browser-test": base64.b64encode(os.urandom(32)).decode()})
    codec_env = {"OUTBOUND_CODEC_KEYS": keys, "OUTBOUND_CODEC_SERVER_TOKEN": TOKEN}
    with detached_devstack(tmp_path / "devstack", "--no-demo", extra_env=codec_env, timeout=40) as stack:
        assert "codec" in stack.state["urls"], "the codec server was not started"
        send = subprocess.run(
            [sys.executable, "starter.py", "send", "--tenant", "acme", "--channel", "email", "--to",
             "kettle.buyer@example.org", "--subject", "Your kettle", "--body", BODY, "--wait", "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={**stack.env, "OUTBOUND_TEMPORAL_ADDRESS": stack.state["urls"]["temporal"],
                 "OUTBOUND_CODEC_KEYS": keys})
        assert send.returncode == 0, send.stdout + send.stderr
        trace = json.loads(send.stdout)
        assert trace["status"] == "delivered"
        yield {**stack.state, "delivery_id": trace["delivery_id"], "state_dir": str(tmp_path / "devstack")}


def text_includes(needle: str) -> str:
    return f"!!document.body && document.body.innerText.includes({json.dumps(needle)})"


def refused_decodes(stack: dict[str, Any]) -> int:
    """How many /decode calls the codec server has answered 401 (its log has one line per request)."""
    log = Path(stack["state_dir"]) / "logs" / "codec.log"
    return sum(1 for line in log.read_text().splitlines() if '"POST /decode' in line and '" 401 ' in line)


async def wait_for_refusal(stack: dict[str, Any], before: int) -> None:
    deadline = time.monotonic() + 20
    while refused_decodes(stack) <= before:
        assert time.monotonic() < deadline, "the Web UI made no (refused) call to the codec server"
        await asyncio.sleep(0.2)


async def open_delivery(page: Page, url: str) -> None:
    """The delivery's page, once its Input has been through the codec server (decoded or not)."""
    await page.call("Page.navigate", url=url)
    await page.wait_for(f"location.href.startsWith({json.dumps(url + '/')}) && {text_includes('Input')} && "
                        f"({text_includes(BODY)} || "
                        "!!document.querySelector('[data-testid=data-encoder-status-error]'))",
                        "the delivery's input, decoded or marked as not decodable")


async def test_web_ui_shows_decoded_payloads_only_to_a_browser_signed_in_at_the_codec_server(
        encrypted_devstack: dict[str, Any], tmp_path: Path) -> None:
    codec = encrypted_devstack["urls"]["codec"]
    workflows = encrypted_devstack["urls"]["web_ui"]  # http://127.0.0.1:<port>/namespaces/default/workflows
    delivery = f"{workflows}/{encrypted_devstack['delivery_id']}"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    async with chromium(profile) as page:
        # The UI's codec settings: "Include cross-origin credentials" is a per-browser setting.
        await page.call("Page.navigate", url=workflows)
        await page.wait_for("!!document.querySelector('[data-testid^=data-encoder-status]')", "the codec icon")
        await page.evaluate("document.querySelector('[data-testid^=data-encoder-status]').click()")
        await page.wait_for("!!document.getElementById('use-local-endpoint-radio')", "the codec settings dialog")
        await page.evaluate("document.getElementById('use-local-endpoint-radio').click()")
        await page.wait_for("!!document.getElementById('data-encoder-endpoint-input')", "the endpoint field")
        await page.evaluate("document.getElementById('data-encoder-endpoint-input').focus()")
        await page.call("Input.insertText", text=codec)
        await page.evaluate("document.getElementById('pass-access-credentials').click()")
        await page.evaluate("document.querySelector('dialog[open] [data-testid=confirm-modal-button]').click()")
        stored = await page.wait_for("localStorage.getItem('includeCredentials') === 'true' && "
                                     "JSON.stringify(Object.assign({}, localStorage))", "the settings stored")
        settings = json.loads(stored)
        assert json.loads(settings["endpoint"]) == codec and settings["overrideRemoteCodecConfiguration"] == "true"

        # Not signed in: the UI's credentialed fetch gets 401, and the input stays ciphertext.
        refused = refused_decodes(encrypted_devstack)
        await open_delivery(page, delivery)
        await wait_for_refusal(encrypted_devstack, refused)
        assert BODY not in await page.evaluate("document.body.innerText")

        # Sign in at the codec server: a form, the token typed in, nothing in the URL.
        await page.call("Page.navigate", url=f"{codec}/login")
        await page.wait_for("!!document.querySelector('input[name=token]')", "the login form")
        await page.evaluate("document.querySelector('input[name=token]').focus()")
        await page.call("Input.insertText", text=TOKEN)
        await page.evaluate("document.querySelector('form').requestSubmit()")
        await page.wait_for(text_includes("Signed in."), "the codec server's signed-in page")
        assert await page.evaluate("location.href") == f"{codec}/login"
        cookies = (await page.call("Network.getCookies", urls=[codec]))["cookies"]
        [session] = [c for c in cookies if c["name"] == "temporal_codec_session"]
        assert session["httpOnly"] and session["sameSite"] == "Lax" and TOKEN not in session["value"]
        assert "temporal_codec_session" not in await page.evaluate("document.cookie")

        # Signed in: the same page shows the reply body.
        await open_delivery(page, delivery)
        await page.wait_for(text_includes(BODY), "the decoded reply body")
        assert not await page.evaluate("!!document.querySelector('[data-testid=data-encoder-status-error]')")

        # Signed out: ciphertext again.
        await page.call("Page.navigate", url=f"{codec}/login")
        await page.wait_for(text_includes("Sign out"), "the sign-out button")
        await page.evaluate("document.querySelector('form[action=\"/logout\"]').requestSubmit()")
        await page.wait_for(text_includes("Signed out."), "the signed-out page")
        refused = refused_decodes(encrypted_devstack)
        await open_delivery(page, delivery)
        await wait_for_refusal(encrypted_devstack, refused)
        assert BODY not in await page.evaluate("document.body.innerText")
