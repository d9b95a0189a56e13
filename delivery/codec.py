"""The payload codec: AES-256-GCM encryption of every payload, with key ids so keys rotate (ARCHITECTURE §5).

The wire format is the one of Temporal's official encryption samples (Go, TypeScript, Python), so a
caller in another language encrypts and decrypts with its SDK's sample codec unchanged:

- metadata `encoding: binary/encrypted` and `encryption-key-id: <key id>`;
- data: a random 12-byte nonce, then the AES-GCM ciphertext (with its 16-byte tag) of the serialized
  inner `Payload` proto; no associated data.

Every configured key decrypts; one encrypts. Payloads with any other encoding pass through `decode`
untouched (histories written before encryption was turned on stay readable).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from delivery.settings import CodecSettings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
TAG_BYTES = 16


class PayloadDecryptionError(ValueError):
    """An encrypted payload this codec cannot decrypt. The message names the key id, never the data."""


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM with several keys for decryption and one for encryption."""

    def __init__(self, keys: Mapping[str, bytes], encrypt_key_id: str) -> None:
        if encrypt_key_id not in keys:
            raise ValueError(f"the encryption key id {encrypt_key_id!r} is not among the keys given")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}  # AESGCM checks the key length
        self.encrypt_key_id = encrypt_key_id

    @classmethod
    def from_settings(cls, settings: CodecSettings) -> EncryptionCodec:
        if not settings.keys or settings.encrypt_key_id is None:
            raise ValueError("no encryption keys configured (OUTBOUND_CODEC_KEYS)")
        return cls(settings.key_material(), settings.encrypt_key_id)

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.encrypt(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.decrypt(payloads)

    # Synchronous forms, for the codec server's request threads.

    def encrypt(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self.encrypt_key_id]
        encrypted = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            encrypted.append(Payload(
                metadata={"encoding": ENCODING, KEY_ID_METADATA: self.encrypt_key_id.encode()},
                data=nonce + cipher.encrypt(nonce, payload.SerializeToString(), None),
            ))
        return encrypted

    def decrypt(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decrypt_one(payload) if payload.metadata.get("encoding") == ENCODING else payload
                for payload in payloads]

    def _decrypt_one(self, payload: Payload) -> Payload:
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("utf-8", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r}, which is not configured (known: "
                f"{', '.join(self._ciphers)}): keep retired keys in OUTBOUND_CODEC_KEYS while histories "
                "written with them are read")
        data = payload.data
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise PayloadDecryptionError(f"payload encrypted with key id {key_id!r} is too short to be AES-GCM")
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], None)
        except InvalidTag:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r} does not decrypt: the key configured under that id "
                "is not the one it was written with, or the payload was altered") from None
        return Payload.FromString(plain)
