"""The one data converter every client, worker, replayer and the codec server use.

Pydantic models as payloads; with keys configured (`OUTBOUND_CODEC_KEYS`), every payload is encrypted
by `delivery.codec.EncryptionCodec`, and so are failure messages and stack traces: an SMTP reply quoted
in a failure can name the buyer's address (docs/SECURITY.md).
"""

from __future__ import annotations

import dataclasses
import logging

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes

from delivery.codec import EncryptionCodec
from delivery.settings import CodecSettings

log = logging.getLogger(__name__)
_announced = False


def data_converter(codec: CodecSettings | None = None) -> DataConverter:
    """Plain without `codec` (or without keys in it); otherwise encrypting payloads and failures.

    Given settings, the process says once (log) whether its payloads are encrypted or plain.
    """
    if codec is not None:
        _announce(codec)
    if codec is None or not codec.enabled:
        return pydantic_data_converter
    return dataclasses.replace(
        pydantic_data_converter,
        payload_codec=EncryptionCodec.from_settings(codec),
        failure_converter_class=DefaultFailureConverterWithEncodedAttributes,
    )


def encryption_status(codec: CodecSettings) -> str:
    if not codec.enabled:
        return ("payloads are PLAIN (not encrypted): reply bodies and buyer addresses are readable in the "
                "Temporal history; set OUTBOUND_CODEC_KEYS to encrypt them (docs/SECURITY.md)")
    return (f"payloads are encrypted (AES-256-GCM) with key id {codec.encrypt_key_id!r}; "
            f"key ids accepted for decryption: {', '.join(codec.keys)}")


def _announce(codec: CodecSettings) -> None:
    global _announced
    if _announced:
        return
    _announced = True
    if codec.enabled:
        log.info(encryption_status(codec))
    else:
        log.warning(encryption_status(codec))
