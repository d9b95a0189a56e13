"""The payload codec: the official samples' wire format, settings that refuse bad keys, and key rotation.

Rotation runs on a real Temporal dev server: deliveries written under key A stay readable (their trace
is rebuilt from history) after the keys become [B, A], and new payloads use B.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from delivery import search_attributes as sa
from delivery.codec import ENCODING, KEY_ID_METADATA, EncryptionCodec, PayloadDecryptionError
from delivery.converter import data_converter, encryption_status
from delivery.history import HistoryNotReplayable, trace_from_history
from delivery.settings import CodecSettings, Settings
from devstack.smtp import SmtpSink
from tests.conftest import Deliveries, _binary
from worker import delivery_worker

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = ROOT / "tests" / "histories"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


KEY_A, KEY_B = new_key(), new_key()


def plain_payload(text: str = "Hello, your parcel left today.") -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([text])[0]


def codec(**keys: str) -> EncryptionCodec:
    return EncryptionCodec.from_settings(CodecSettings(keys=keys))


# --- wire format ---------------------------------------------------------------------------------


async def test_encoded_payload_is_the_official_samples_wire_format() -> None:
    original = plain_payload()
    [encoded] = await codec(a=KEY_A).encode([original])

    assert dict(encoded.metadata) == {"encoding": b"binary/encrypted", "encryption-key-id": b"a"}
    # What the Go and TypeScript sample codecs do to decrypt: nonce = first 12 bytes, AES-GCM, no AAD,
    # and the plaintext is the serialized inner Payload.
    nonce, ciphertext = encoded.data[:12], encoded.data[12:]
    inner = Payload.FromString(AESGCM(base64.b64decode(KEY_A)).decrypt(nonce, ciphertext, None))
    assert inner == original
    assert b"parcel" not in encoded.data


async def test_a_payload_encrypted_by_another_languages_sample_codec_decodes() -> None:
    original = plain_payload("from TypeScript")
    nonce = os.urandom(12)
    foreign = Payload(metadata={"encoding": b"binary/encrypted", "encryption-key-id": b"a"},
                      data=nonce + AESGCM(base64.b64decode(KEY_A)).encrypt(nonce, original.SerializeToString(), None))

    assert await codec(a=KEY_A).decode([foreign]) == [original]


async def test_every_encoding_uses_a_fresh_nonce() -> None:
    same = plain_payload()
    first, second = await codec(a=KEY_A).encode([same, same])
    assert first.data[:12] != second.data[:12] and first.data != second.data


async def test_plain_and_unknown_encodings_pass_through_decode() -> None:
    plain = plain_payload()
    compressed = Payload(metadata={"encoding": b"binary/zlib"}, data=b"\x78\x9c")
    assert await codec(a=KEY_A).decode([plain, compressed]) == [plain, compressed]


async def test_unknown_key_id_is_refused_naming_the_id_never_the_data() -> None:
    [encoded] = await codec(old=KEY_A).encode([plain_payload("secret reply text")])

    with pytest.raises(PayloadDecryptionError) as refused:
        await codec(new=KEY_B).decode([encoded])
    assert "'old'" in str(refused.value) and "OUTBOUND_CODEC_KEYS" in str(refused.value)
    assert "secret reply text" not in str(refused.value)


async def test_a_key_id_with_other_key_material_or_altered_data_is_refused() -> None:
    [encoded] = await codec(a=KEY_A).encode([plain_payload()])
    with pytest.raises(PayloadDecryptionError, match="does not decrypt"):
        await codec(a=KEY_B).decode([encoded])
    altered = Payload(metadata=encoded.metadata, data=encoded.data[:-1] + bytes([encoded.data[-1] ^ 1]))
    with pytest.raises(PayloadDecryptionError, match="does not decrypt"):
        await codec(a=KEY_A).decode([altered])


# --- settings ------------------------------------------------------------------------------------


def test_keys_come_from_the_environment_newest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTBOUND_CODEC_KEYS", f'{{"2026-06": "{KEY_B}", "2026-01": "{KEY_A}"}}')
    monkeypatch.setenv("OUTBOUND_CODEC_SERVER_TOKEN", "t0ken")
    settings = Settings().codec

    assert settings.encrypt_key_id == "2026-06"
    assert list(settings.keys) == ["2026-06", "2026-01"]
    assert settings.server_token is not None and settings.server_token.get_secret_value() == "t0ken"
    assert KEY_A not in repr(settings) and "t0ken" not in repr(settings)
    monkeypatch.setenv("OUTBOUND_CODEC_ENCRYPT_KEY_ID", "2026-01")
    assert Settings().codec.encrypt_key_id == "2026-01"


@pytest.mark.parametrize(("values", "message"), [
    ({"keys": {"a": "not base64!"}}, "key 'a' is not base64"),
    ({"keys": {"a": base64.b64encode(os.urandom(16)).decode()}}, "key 'a' is 16 bytes; AES-256-GCM needs exactly 32"),
    ({"keys": {"a b": KEY_A}}, "key id 'a b' must be 1-64 characters"),
    ({"keys": {"a": KEY_A}, "encrypt_key_id": "b"}, "OUTBOUND_CODEC_ENCRYPT_KEY_ID 'b' is not a key"),
    ({"encrypt_key_id": "b"}, "(configured: none)"),
    ({"ui_origin": "http://127.0.0.1:8233/namespaces"}, "is not an origin"),
    ({"ui_origin": "*"}, "is not an origin"),
])
def test_bad_codec_settings_are_refused_clearly_without_echoing_a_key(values: dict[str, object],
                                                                      message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CodecSettings(**values)  # type: ignore[arg-type]
    assert message in str(refused.value)
    keys = values.get("keys")
    for material in (keys.values() if isinstance(keys, dict) else ()):
        assert str(material) not in str(refused.value), "a key was echoed into the error"


# --- the converter -------------------------------------------------------------------------------


def test_without_keys_the_converter_is_the_plain_pydantic_one() -> None:
    assert data_converter() is pydantic_data_converter
    assert data_converter(CodecSettings()).payload_codec is None
    assert "PLAIN" in encryption_status(CodecSettings())


async def test_with_keys_payloads_and_failure_messages_are_encrypted() -> None:
    converter = data_converter(CodecSettings(keys={"a": KEY_A}))
    [payload] = await converter.encode(["buyer@example.org"])
    assert payload.metadata["encoding"] == ENCODING and payload.metadata[KEY_ID_METADATA] == b"a"

    failure = Failure()
    await converter.encode_failure(ApplicationError("SMTP 550 <buyer@example.org> unknown"), failure)
    assert failure.message == "Encoded failure" and b"buyer@example.org" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert isinstance(decoded, ApplicationError) and decoded.message == "SMTP 550 <buyer@example.org> unknown"


def test_the_cli_says_once_at_start_that_payloads_are_plain(temporal_env: WorkflowEnvironment) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    env["OUTBOUND_TEMPORAL_ADDRESS"] = temporal_env.client.service_client.config.target_host
    listing = subprocess.run([sys.executable, "starter.py", "list", "--tenant", "nobody"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert listing.stderr.count("payloads are PLAIN (not encrypted)") == 1
    assert "OUTBOUND_CODEC_KEYS" in listing.stderr

    env["OUTBOUND_CODEC_KEYS"] = f'{{"a": "{KEY_A}"}}'
    listing = subprocess.run([sys.executable, "starter.py", "list", "--tenant", "nobody"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "PLAIN" not in listing.stderr


def test_the_worker_says_once_at_start_whether_payloads_are_encrypted(temporal_env: WorkflowEnvironment,
                                                                       tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    env.update({"OUTBOUND_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
                "OUTBOUND_TEMPORAL_TASK_QUEUE": f"announce-{os.getpid()}",
                "OUTBOUND_TRACE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'trace.db'}",
                "OUTBOUND_CODEC_KEYS": f'{{"2026-06": "{KEY_B}", "2026-01": "{KEY_A}"}}'})
    worker = subprocess.Popen([sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert worker.stdout is not None
        for line in worker.stdout:
            lines.append(line)
            if "worker serving task queue" in line:
                break
    finally:
        worker.terminate()
        rest, _ = worker.communicate(timeout=60)
    output = "".join(lines) + rest
    assert "worker serving task queue" in output, output
    announced = [line for line in output.splitlines() if "payloads are" in line]
    assert len(announced) == 1 and "encrypted (AES-256-GCM) with key id '2026-06'" in announced[0]
    assert "2026-01" in announced[0] and KEY_A not in output and KEY_B not in output


# --- rotation, on a real server ------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def encrypted_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=data_converter(CodecSettings(keys={"A": KEY_A})),
        search_attributes=list(sa.ALL),
        dev_server_log_level="error",
    )
    async with env:
        yield env


async def client_with(env: WorkflowEnvironment, codec: CodecSettings | None) -> Client:
    return await Client.connect(env.client.service_client.config.target_host, namespace=env.client.namespace,
                                data_converter=data_converter(codec) if codec else data_converter())


async def key_ids_in(client: Client, delivery_id: str) -> set[str]:
    history = await client.get_workflow_handle(delivery_id).fetch_history()
    found = set()
    for event in history.events:
        attributes = getattr(event, event.WhichOneof("attributes") or "", None)
        for field in ("input", "result"):
            payloads = getattr(attributes, field, None)
            for payload in getattr(payloads, "payloads", []):
                found.add(payload.metadata.get(KEY_ID_METADATA, b"<plain>").decode())
    return found


async def test_keys_rotate_old_payloads_still_decode_new_ones_use_the_new_key(
        encrypted_env: WorkflowEnvironment, settings: Settings, smtp: SmtpSink,
        request: pytest.FixtureRequest) -> None:
    only_a = CodecSettings(keys={"A": KEY_A})
    b_then_a = CodecSettings(keys={"B": KEY_B, "A": KEY_A})

    before = Deliveries(await client_with(encrypted_env, only_a), settings, request.node.name)
    async with delivery_worker(before.client, settings):
        old = await before.deliver(channel="email", to="buyer.before@example.org")

    after = Deliveries(await client_with(encrypted_env, b_then_a), settings, request.node.name)
    async with delivery_worker(after.client, settings):
        new = await after.deliver(channel="email", to="buyer.after@example.org")

    assert (old.status, new.status) == ("delivered", "delivered")
    assert len(smtp.messages()) == 2
    raw = await client_with(encrypted_env, None)
    assert await key_ids_in(raw, old.delivery_id) == {"A"}
    assert await key_ids_in(raw, new.delivery_id) == {"B"}, "new payloads must be encrypted with the first key"

    old_history = await raw.get_workflow_handle(old.delivery_id).fetch_history()
    assert await trace_from_history(old_history, after.client.data_converter) == old
    # A retired key dropped too early: refused, not misread (the message itself is encrypted with B, so
    # only the error type is readable here; see the report on delivery/history.py).
    with pytest.raises(HistoryNotReplayable, match="PayloadDecryptionError"):
        await trace_from_history(old_history, data_converter(CodecSettings(keys={"B": KEY_B})))


async def test_histories_written_before_encryption_was_turned_on_still_rebuild() -> None:
    path = HISTORIES / "test_email_channel_goes_by_smtp_only_1.json"
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    converter = data_converter(CodecSettings(keys={"B": KEY_B, "A": KEY_A}))

    assert await trace_from_history(history, converter) == await trace_from_history(history, data_converter())
