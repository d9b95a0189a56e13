"""The codec server: Temporal's remote-codec protocol, a bearer token, CORS for the UI origin alone.

The last tests run the real `temporal` CLI against a real dev server: without the codec it shows no
reply body or buyer address; through the codec server, with the token, it shows both.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from delivery import search_attributes as sa
from delivery.codec import EncryptionCodec
from delivery.codec_server import MAX_BODY_BYTES, CodecServer, CodecService
from delivery.converter import data_converter
from delivery.settings import CodecSettings, Settings
from devstack.launcher import DevstackSettings, _write_state, services
from devstack.smtp import SmtpSink
from tests.conftest import Deliveries, _binary, free_ports
from worker import delivery_worker

ROOT = Path(__file__).resolve().parents[1]
KEY = base64.b64encode(os.urandom(32)).decode()
TOKEN = "codec-token-S3cr3t"
UI_ORIGIN = "http://127.0.0.1:8233"
CODEC = CodecSettings(keys={"k1": KEY}, server_token=TOKEN, ui_origin=UI_ORIGIN)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server() -> Iterator[CodecServer]:
    with CodecServer(CodecService.from_settings(CODEC), port=0) as running:
        yield running


def as_json(payloads: list[Payload]) -> dict[str, Any]:
    return json_format.MessageToDict(Payloads(payloads=payloads))


def from_json(body: dict[str, Any]) -> list[Payload]:
    return list(json_format.ParseDict(body, Payloads()).payloads)


def plain(text: str) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([text])[0]


def encrypted(text: str) -> Payload:
    return EncryptionCodec.from_settings(CODEC).encrypt([plain(text)])[0]


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token", f"Basic {TOKEN}", TOKEN, "Bearer",
                                           f"Bearer {TOKEN}x"])
def test_decode_without_the_right_bearer_token_is_401(server: CodecServer, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    answer = httpx.post(f"{server.url}/decode", json=as_json([encrypted("buyer@example.org")]), headers=headers)

    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "buyer@example.org" not in answer.text


@pytest.mark.parametrize("path", ["/decode", "/default/decode", "/replies-prod/decode/"])
def test_decode_with_the_token_returns_the_plain_payloads(server: CodecServer, path: str) -> None:
    answer = httpx.post(f"{server.url}{path}", json=as_json([encrypted("buyer@example.org"), plain("as is")]),
                        headers={**AUTH, "X-Namespace": "default"})

    assert answer.status_code == 200, answer.text
    assert from_json(answer.json()) == [plain("buyer@example.org"), plain("as is")]


def test_encode_then_decode_round_trips_and_encode_uses_the_current_key(server: CodecServer) -> None:
    encoded = httpx.post(f"{server.url}/encode", json=as_json([plain("hello")]), headers=AUTH)
    assert encoded.status_code == 200
    [payload] = from_json(encoded.json())
    assert payload.metadata["encoding"] == b"binary/encrypted" and payload.metadata["encryption-key-id"] == b"k1"

    decoded = httpx.post(f"{server.url}/default/decode", json=encoded.json(), headers=AUTH)
    assert from_json(decoded.json()) == [plain("hello")]


# --- CORS ----------------------------------------------------------------------------------------


def test_the_ui_origins_preflight_is_answered(server: CodecServer) -> None:
    answer = httpx.options(f"{server.url}/decode", headers={
        "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace,authorization"})

    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert answer.headers["Access-Control-Allow-Methods"] == "POST"
    allowed = {h.strip() for h in answer.headers["Access-Control-Allow-Headers"].split(",")}
    assert allowed == {"content-type", "x-namespace", "authorization"}
    assert answer.headers["Vary"] == "Origin"


def test_a_request_from_the_ui_origin_gets_its_cors_headers(server: CodecServer) -> None:
    answer = httpx.post(f"{server.url}/decode", json=as_json([encrypted("x")]), headers={**AUTH, "Origin": UI_ORIGIN})
    assert answer.status_code == 200 and answer.headers["Access-Control-Allow-Origin"] == UI_ORIGIN


@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:8233", "http://127.0.0.1:8234", "null"])
def test_a_cross_origin_request_from_another_origin_is_refused(server: CodecServer, origin: str) -> None:
    preflight = httpx.options(f"{server.url}/decode", headers={"Origin": origin,
                                                               "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403
    assert "Access-Control-Allow-Origin" not in preflight.headers

    # Even with the token (a page that stole it, or a browser extension): no decoded payload leaves.
    answer = httpx.post(f"{server.url}/decode", json=as_json([encrypted("buyer@example.org")]),
                        headers={**AUTH, "Origin": origin})
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert "buyer@example.org" not in answer.text


# --- malformed requests --------------------------------------------------------------------------


def test_malformed_requests_are_refused_without_echoing_content(server: CodecServer) -> None:
    assert httpx.post(f"{server.url}/decode", content=b"{not json", headers=AUTH).status_code == 400
    assert httpx.post(f"{server.url}/decode", json={"payloads": "nope"}, headers=AUTH).status_code == 400
    assert httpx.get(f"{server.url}/decode", headers=AUTH).status_code == 405
    assert httpx.post(f"{server.url}/a/b/decode", json={}, headers=AUTH).status_code == 404
    assert httpx.post(f"{server.url}/", json={}, headers=AUTH).status_code == 404

    other_key = CodecSettings(keys={"retired": base64.b64encode(os.urandom(32)).decode()})
    foreign = EncryptionCodec.from_settings(other_key).encrypt([plain("buyer@example.org")])
    answer = httpx.post(f"{server.url}/decode", json=as_json(foreign), headers=AUTH)
    assert answer.status_code == 400
    assert "'retired'" in answer.json()["message"] and "buyer@example.org" not in answer.text


def test_an_oversized_body_is_refused_before_it_is_read(server: CodecServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(f"POST /decode HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        reply = sock.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413")


# --- the process and its place in the dev stack ---------------------------------------------------


def codec_environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    env.update(extra)
    return env


def test_the_server_on_a_taken_port_says_which_without_a_traceback() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "delivery.codec_server", "--port", str(port)], cwd=ROOT,
                             env=codec_environment(OUTBOUND_CODEC_KEYS=json.dumps({"k1": KEY}),
                                                   OUTBOUND_CODEC_SERVER_TOKEN=TOKEN),
                             capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_server_refuses_to_start_without_keys_or_token() -> None:
    command = [sys.executable, "-m", "delivery.codec_server", "--port", str(free_ports(1)[0])]
    no_keys = subprocess.run(command, cwd=ROOT, env=codec_environment(OUTBOUND_CODEC_SERVER_TOKEN=TOKEN),
                             capture_output=True, text=True, timeout=30)
    assert no_keys.returncode == 2 and "OUTBOUND_CODEC_KEYS" in no_keys.stderr
    no_token = subprocess.run(command, cwd=ROOT, env=codec_environment(OUTBOUND_CODEC_KEYS=json.dumps({"k1": KEY})),
                              capture_output=True, text=True, timeout=30)
    assert no_token.returncode == 2 and "OUTBOUND_CODEC_SERVER_TOKEN" in no_token.stderr
    assert KEY not in no_token.stderr


def test_the_dev_stack_starts_the_codec_server_and_points_the_ui_at_it(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    for name in [k for k in os.environ if k.startswith("OUTBOUND_CODEC_")]:
        monkeypatch.delenv(name)
    cfg = DevstackSettings(state_dir=tmp_path, codec_port=free_ports(1)[0], ui_port=free_ports(1)[0])
    plain_stack = services(cfg)
    assert "codec" not in [svc.name for svc in plain_stack]
    assert "--ui-codec-endpoint" not in plain_stack[0].argv

    monkeypatch.setenv("OUTBOUND_CODEC_KEYS", json.dumps({"k1": KEY}))
    stack = {svc.name: svc for svc in services(cfg)}
    endpoint = f"http://127.0.0.1:{cfg.codec_port}"
    assert stack["temporal"].argv[-2:] == ["--ui-codec-endpoint", endpoint]
    assert list(stack)[-1] == "worker" and "codec" in stack
    token = (tmp_path / "codec_token").read_text().strip()
    assert (tmp_path / "codec_token").stat().st_mode & 0o777 == 0o600
    assert stack["codec"].env["OUTBOUND_CODEC_UI_ORIGIN"] == f"http://127.0.0.1:{cfg.ui_port}"

    state = _write_state(cfg, list(stack.values()))
    written = cfg.stack_file.read_text()
    assert state["urls"]["codec"] == endpoint
    assert KEY not in written and token not in written, "stack.json must not hold the keys or the token"

    # The service as the launcher would start it: refuses without the token, decodes with it.
    process = subprocess.Popen(stack["codec"].argv, cwd=ROOT, env={**os.environ, **stack["codec"].env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = as_json([encrypted("hello")])
        for _ in range(100):
            try:
                refused = httpx.post(f"{endpoint}/decode", json=body)
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        assert refused.status_code == 401
        answer = httpx.post(f"{endpoint}/decode", json=as_json(EncryptionCodec.from_settings(
            CodecSettings(keys={"k1": KEY})).encrypt([plain("hello")])),
            headers={"Authorization": f"Bearer {token}", "Origin": f"http://127.0.0.1:{cfg.ui_port}"})
        assert answer.status_code == 200 and from_json(answer.json()) == [plain("hello")]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert token not in output and KEY not in output


# --- acceptance: the real `temporal` CLI, with and without the codec server -------------------------


@pytest_asyncio.fixture(scope="module")
async def encrypted_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=data_converter(CODEC),
        search_attributes=list(sa.ALL),
        dev_server_log_level="error",
    )
    async with env:
        yield env


def temporal_show(env: WorkflowEnvironment, delivery_id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_binary("temporal"), "workflow", "show", "--address",
                           env.client.service_client.config.target_host, "-w", delivery_id, *extra],
                          capture_output=True, text=True, timeout=60, env=codec_environment())


def decoded_data(show_json: str) -> str:
    """Every payload's data in `temporal workflow show --output json`, base64-decoded, as one text."""
    texts = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "metadata" in node and "data" in node and isinstance(node["data"], str):
                texts.append(base64.b64decode(node["data"]).decode("utf-8", "replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(show_json))
    return "\n".join(texts)


async def test_temporal_cli_shows_body_and_address_only_through_the_codec_server(
        encrypted_env: WorkflowEnvironment, settings: Settings, smtp: SmtpSink, server: CodecServer,
        request: pytest.FixtureRequest) -> None:
    body = "Dear buyer, your replacement kettle ships on Monday."
    address = "kettle.buyer@example.org"
    deliveries = Deliveries(encrypted_env.client, settings, request.node.name)
    async with delivery_worker(encrypted_env.client, settings):
        trace = await deliveries.deliver(channel="email", to=address, body_text=body)
    assert trace.status == "delivered" and smtp.messages()[0]["rcpt_tos"] == [address]

    for form in (["--detailed"], ["--output", "json"]):
        without = temporal_show(encrypted_env, trace.delivery_id, *form)
        assert without.returncode == 0, without.stderr
        shown = without.stdout + (decoded_data(without.stdout) if "json" in form else "")
        assert body not in shown and address not in shown
        assert "binary/encrypted" in shown or "YmluYXJ5L2VuY3J5cHRlZA==" in shown

    codec_flags = ["--codec-endpoint", server.url, "--codec-auth", f"Bearer {TOKEN}"]
    readable = temporal_show(encrypted_env, trace.delivery_id, "--detailed", *codec_flags)
    assert readable.returncode == 0, readable.stderr
    assert body in readable.stdout and address in readable.stdout
    # (With a wrong token the CLI retries the 401 for ~10 s, then fails; the 401 itself is tested above.)
