"""The codec server's browser login: a form, a stateless HttpOnly session cookie, CORS with credentials.

The Temporal Web UI cannot send our bearer token; with "include cross-origin credentials" on, its fetch
carries cookies, so `POST /login` turns the token into a cookie that `/decode` accepts. The real
browser path is tests/test_browser_codec.py.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.contrib.pydantic import pydantic_data_converter

from delivery.codec import EncryptionCodec
from delivery.codec_server import SESSION_COOKIE, CodecServer, CodecService
from delivery.settings import CodecSettings

KEY = base64.b64encode(os.urandom(32)).decode()
TOKEN = "codec-token-S3cr3t"
UI_ORIGIN = "http://127.0.0.1:8233"
CODEC = CodecSettings(keys={"k1": KEY}, server_token=TOKEN, ui_origin=UI_ORIGIN)


@pytest.fixture(scope="module")
def server() -> Iterator[CodecServer]:
    with CodecServer(CodecService.from_settings(CODEC), port=0) as running:
        yield running


def plain(text: str) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([text])[0]


def encrypted_body(text: str) -> dict[str, Any]:
    return json_format.MessageToDict(Payloads(payloads=EncryptionCodec.from_settings(CODEC).encrypt([plain(text)])))


def decoded(answer: httpx.Response) -> list[Payload]:
    return list(json_format.ParseDict(answer.json(), Payloads()).payloads)


def login(server: CodecServer, token: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/login", data={"token": token}, headers=headers)


def session_cookie(answer: httpx.Response) -> str:
    return answer.cookies[SESSION_COOKIE]


def test_the_login_page_is_a_form_that_posts_the_token_and_puts_nothing_in_the_url(server: CodecServer) -> None:
    page = httpx.get(f"{server.url}/login")

    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<form method="post" action="/login">' in page.text and 'name="token"' in page.text
    assert 'type="password"' in page.text
    assert page.headers["Cache-Control"] == "no-store" and "frame-ancestors 'none'" in page.headers[
        "Content-Security-Policy"]
    assert "set-cookie" not in page.headers
    assert TOKEN not in page.text


@pytest.mark.parametrize("token", ["wrong-token", "", TOKEN + "x", TOKEN[:-1], f"Bearer {TOKEN}"])
def test_a_login_with_a_wrong_token_is_401_and_sets_no_cookie(server: CodecServer, token: str) -> None:
    answer = login(server, token)

    assert answer.status_code == 401
    assert "set-cookie" not in answer.headers
    assert "Wrong token" in answer.text and TOKEN not in answer.text


def test_a_login_with_the_right_token_sets_an_httponly_samesite_lax_session_cookie(server: CodecServer) -> None:
    answer = login(server, TOKEN)

    assert answer.status_code == 200 and "Signed in" in answer.text
    set_cookie = answer.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
    assert {"httponly", "path", "samesite"} <= attributes
    assert "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
    assert "Secure" not in set_cookie, "an http UI origin: a Secure cookie would never be sent back"
    value = session_cookie(answer)
    assert TOKEN not in value and len(value) == 64, "the cookie is an HMAC, not the token"
    assert session_cookie(login(server, TOKEN)) == value, "stateless: the same token gives the same cookie"


def test_the_cookie_is_accepted_for_decode_and_encode(server: CodecServer) -> None:
    cookies = {"Cookie": f"{SESSION_COOKIE}={session_cookie(login(server, TOKEN))}"}

    answer = httpx.post(f"{server.url}/decode", json=encrypted_body("buyer@example.org"), headers=cookies)
    assert answer.status_code == 200, answer.text
    assert decoded(answer) == [plain("buyer@example.org")]

    from_the_ui = httpx.post(f"{server.url}/default/decode", json=encrypted_body("hello"),
                             headers={**cookies, "Origin": UI_ORIGIN, "X-Namespace": "default"})
    assert from_the_ui.status_code == 200 and decoded(from_the_ui) == [plain("hello")]
    assert httpx.post(f"{server.url}/encode", json={"payloads": []}, headers=cookies).status_code == 200


@pytest.mark.parametrize("cookie", ["", "0" * 64, "not-a-session", TOKEN])
def test_without_a_valid_cookie_or_token_decode_is_401(server: CodecServer, cookie: str) -> None:
    answer = httpx.post(f"{server.url}/decode", json=encrypted_body("buyer@example.org"),
                        headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})
    assert answer.status_code == 401 and "buyer@example.org" not in answer.text


def test_a_cookie_made_under_another_token_is_refused() -> None:
    """A new token voids every session: the cookie is an HMAC under the token."""
    other = CodecSettings(keys={"k1": KEY}, server_token="the-previous-token", ui_origin=UI_ORIGIN)
    with CodecServer(CodecService.from_settings(other), port=0) as previous:
        stale = session_cookie(login(previous, "the-previous-token"))
    with CodecServer(CodecService.from_settings(CODEC), port=0) as current:
        answer = httpx.post(f"{current.url}/decode", json=encrypted_body("buyer@example.org"),
                            headers={"Cookie": f"{SESSION_COOKIE}={stale}"})
        assert answer.status_code == 401 and "buyer@example.org" not in answer.text
        assert session_cookie(login(current, TOKEN)) != stale


def test_cors_allows_credentials_for_the_ui_origin_only_and_never_a_wildcard(server: CodecServer) -> None:
    preflight = httpx.options(f"{server.url}/decode", headers={
        "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"

    cookies = {"Cookie": f"{SESSION_COOKIE}={session_cookie(login(server, TOKEN))}"}
    answer = httpx.post(f"{server.url}/decode", json=encrypted_body("x"), headers={**cookies, "Origin": UI_ORIGIN})
    assert answer.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert answer.headers["Access-Control-Allow-Credentials"] == "true"

    for origin in ("http://evil.example", "http://127.0.0.1:8234", "null"):
        refused = httpx.post(f"{server.url}/decode", json=encrypted_body("buyer@example.org"),
                             headers={**cookies, "Origin": origin})
        assert refused.status_code == 403 and "buyer@example.org" not in refused.text
        assert "Access-Control-Allow-Origin" not in refused.headers
        assert "Access-Control-Allow-Credentials" not in refused.headers
    # Without an Origin (the CLI) there is no CORS at all.
    cli = httpx.post(f"{server.url}/decode", json=encrypted_body("x"), headers={"Authorization": f"Bearer {TOKEN}"})
    assert "Access-Control-Allow-Credentials" not in cli.headers and "Access-Control-Allow-Origin" not in cli.headers


def test_a_login_or_logout_posted_from_another_site_is_refused(server: CodecServer) -> None:
    for path in ("/login", "/logout"):
        answer = httpx.post(f"{server.url}{path}", data={"token": TOKEN}, headers={"Origin": "http://evil.example"})
        assert answer.status_code == 403 and "set-cookie" not in answer.headers
    # The form posted from the codec server's own page (same origin) and from the UI origin is fine.
    assert login(server, TOKEN, Origin=server.url).status_code == 200
    assert login(server, TOKEN, Origin=UI_ORIGIN).status_code == 200


def test_logout_clears_the_cookie(server: CodecServer) -> None:
    with httpx.Client(base_url=server.url) as browser:  # keeps cookies like a browser
        assert browser.post("/login", data={"token": TOKEN}).status_code == 200
        assert browser.post("/decode", json=encrypted_body("x")).status_code == 200
        assert "Sign out" in browser.get("/login").text

        out = browser.post("/logout")
        assert out.status_code == 200 and "Signed out" in out.text
        assert out.headers["set-cookie"].startswith(f"{SESSION_COOKIE}=;") and "Max-Age=0" in out.headers["set-cookie"]
        assert SESSION_COOKIE not in browser.cookies
        assert browser.post("/decode", json=encrypted_body("x")).status_code == 401
    assert httpx.get(f"{server.url}/logout").status_code == 405


def test_an_https_ui_origin_gets_a_secure_cookie_and_an_oversized_login_is_refused() -> None:
    secure = CodecSettings(keys={"k1": KEY}, server_token=TOKEN, ui_origin="https://temporal.example.com")
    with CodecServer(CodecService.from_settings(secure), port=0) as server:
        assert "; Secure" in login(server, TOKEN).headers["set-cookie"]
        big = httpx.post(f"{server.url}/login", content=b"token=" + b"x" * 5000,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert big.status_code == 413 and "set-cookie" not in big.headers
