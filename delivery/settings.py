"""Settings from the environment (pydantic-settings). Each part has its own prefix under `OUTBOUND_`.

The README's configuration table lists every variable; keep the two in step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from delivery import TASK_QUEUE


class TemporalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_TEMPORAL_")

    address: str = "localhost:7233"
    namespace: str = "default"
    task_queue: str = TASK_QUEUE


class VaultSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_VAULT_")

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
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_SPAPI_")

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
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_SMTP_")

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
    model_config = SettingsConfigDict(env_prefix="OUTBOUND_TRACE_")

    database_url: str = "sqlite+aiosqlite:///.devstack/delivery_trace.db"


class Settings(BaseSettings):
    """All settings of a worker or starter process."""

    model_config = SettingsConfigDict(env_prefix="OUTBOUND_")

    temporal: TemporalSettings = Field(default_factory=TemporalSettings)
    vault: VaultSettings = Field(default_factory=VaultSettings)
    spapi: SpapiSettings = Field(default_factory=SpapiSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    trace: TraceSettings = Field(default_factory=TraceSettings)
