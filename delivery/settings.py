"""Settings from the environment (pydantic-settings). Each part has its own prefix under `OUTBOUND_`.

The README's configuration table lists every variable; keep the two in step.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from delivery import TASK_QUEUE


class TemporalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_TEMPORAL_", hide_input_in_errors=True)

    address: str = "localhost:7233"
    namespace: str = "default"
    task_queue: str = TASK_QUEUE


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_VAULT_", hide_input_in_errors=True)

    addr: str = "http://127.0.0.1:8200"
    token: SecretStr | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    approle_mount: str = "approle"
    namespace: str | None = None
    kv_mount: str = "secret"
    app_path: str = "keybuzz/amazon_spapi/app"
    tenant_path: str = Field(default="keybuzz/tenants/{tenant_id}/amazon_spapi",
                             description="`{tenant_id}` is replaced by the validated tenant slug")
    cache_ttl_s: float = 300.0
    outage_grace_s: float = 900.0
    timeout_s: float = 5.0


class SpapiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_SPAPI_", hide_input_in_errors=True)

    endpoint: str | None = Field(default=None, description="Override the regional endpoint (stand-in, sandbox)")
    lwa_endpoint: str = "https://api.amazon.com/auth/o2/token"
    # A help-desk reply is an order-related note: the general types first, never customization or
    # digital-access-key unless the request pins them.
    message_type_preference: list[str] = Field(
        default=["confirmOrderDetails", "confirmDeliveryDetails", "unexpectedProblem", "confirmServiceDetails"]
    )
    rate_per_s: float = 1.0
    burst: int = 5
    local_throttle: bool = True
    # Longest wait for a local quota slot inside one attempt; beyond it the attempt ends `throttled` and
    # the workflow waits instead (keeps attempts short of their timeout and heartbeat timeout).
    max_local_wait_s: float = 10.0
    actions_cache_ttl_s: float = 60.0
    timeout_s: float = 15.0
    user_agent: str = "outbound-reply-delivery/0.1 (Language=Python)"


SmtpSecurity = Literal["starttls", "tls", "none"]


class SmtpTenantOverride(BaseModel):
    """One tenant's own relay or sender. An unset field falls back to the global SMTP setting."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    security: SmtpSecurity | None = None
    username: str | None = None
    password: SecretStr | None = None
    from_address: str | None = Field(default=None, description="`addr` or `Display Name <addr>`")


class SmtpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_SMTP_", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = 587
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    validate_certs: bool = True
    ca_file: str | None = Field(
        default=None,
        description="PEM file of CA certificates trusted on top of the system's (a private CA, the dev "
                    "sink's self-signed certificate), so verification can stay on",
    )
    from_address: str = Field(default="support@example.com", description="`addr` or `Display Name <addr>`")
    timeout_s: float = 30.0
    tenants: dict[str, SmtpTenantOverride] = Field(
        default_factory=dict, description="JSON object in OUTBOUND_SMTP_TENANTS: tenant id -> override"
    )

    def for_tenant(self, tenant_id: str) -> SmtpSettings:
        """The settings one tenant's replies are sent with: its override, field by field, over these."""
        override = self.tenants.get(tenant_id)
        if override is None:
            return self
        changes = {name: value for name, value in override if value is not None}
        if "host" in changes:
            # The global relay's login must never be sent to another host: credentials go with the host.
            changes.setdefault("username", None)
            changes.setdefault("password", None)
        return self.model_copy(update={**changes, "tenants": {}})


class TraceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_TRACE_", hide_input_in_errors=True)

    database_url: str = "sqlite+aiosqlite:///.devstack/delivery_trace.db"


CODEC_KEY_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
CODEC_KEY_BYTES = 32  # AES-256


class CodecSettings(BaseSettings):
    """Payload encryption (ARCHITECTURE §5, docs/SECURITY.md). Without keys, payloads are plain.

    Every key decrypts; the `encrypt_key_id` one (by default the first) encrypts, so keys rotate by
    putting a new key first and keeping the old ones for the payloads written before.
    """

    # A refused key must not be echoed back into an error message or a log.
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_CODEC_", hide_input_in_errors=True)

    keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='JSON object in OUTBOUND_CODEC_KEYS: key id -> base64 of 32 random bytes, newest first, '
                    'e.g. {"2026-06": "<base64>", "2026-01": "<base64>"}',
    )
    encrypt_key_id: str | None = Field(default=None, description="Key id new payloads use; default: the first key")
    server_token: SecretStr | None = Field(
        default=None, description="Bearer token the codec server requires (`Authorization: Bearer <token>`)")
    ui_origin: str = Field(default="http://127.0.0.1:8233",
                           description="The one browser origin (the Temporal Web UI) the codec server answers")

    @field_validator("keys")
    @classmethod
    def _keys_are_aes_256(cls, keys: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key_id, secret in keys.items():
            if not re.match(CODEC_KEY_ID_PATTERN, key_id):
                raise ValueError(f"key id {key_id!r} must be 1-64 characters of letters, digits and . _ : - "
                                 "(it is written into every payload's metadata)")
            try:
                material = base64.b64decode(secret.get_secret_value(), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"key {key_id!r} is not base64 (make one with "
                                 "`python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'`)"
                                 ) from None
            if len(material) != CODEC_KEY_BYTES:
                raise ValueError(f"key {key_id!r} is {len(material)} bytes; AES-256-GCM needs exactly "
                                 f"{CODEC_KEY_BYTES} (base64 of 32 random bytes)")
        return keys

    @field_validator("ui_origin")
    @classmethod
    def _origin_is_one_origin(cls, origin: str) -> str:
        origin = origin.rstrip("/")
        if not re.match(r"^https?://[^/\s*]+$", origin):
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path, no wildcard)")
        return origin

    @model_validator(mode="after")
    def _encrypt_key_is_configured(self) -> CodecSettings:
        if self.encrypt_key_id is None:
            self.encrypt_key_id = next(iter(self.keys), None)
        elif self.encrypt_key_id not in self.keys:
            known = ", ".join(self.keys) or "none"
            raise ValueError(f"OUTBOUND_CODEC_ENCRYPT_KEY_ID {self.encrypt_key_id!r} is not a key of "
                             f"OUTBOUND_CODEC_KEYS (configured: {known})")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def key_material(self) -> dict[str, bytes]:
        """Key id -> the 32 key bytes, in the configured order."""
        return {key_id: base64.b64decode(secret.get_secret_value()) for key_id, secret in self.keys.items()}


class Settings(BaseSettings):
    """All settings of a worker or starter process."""

    model_config = SettingsConfigDict(env_prefix="OUTBOUND_", hide_input_in_errors=True)

    temporal: TemporalSettings = Field(default_factory=TemporalSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    spapi: SpapiSettings = Field(default_factory=SpapiSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    trace: TraceSettings = Field(default_factory=TraceSettings)
    codec: CodecSettings = Field(default_factory=CodecSettings)
