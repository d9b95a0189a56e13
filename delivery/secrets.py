"""The worker-local shape of SP-API secrets, and where `spapi_send` gets them from.

Secrets stay inside the worker process: activities exchange a `CredentialsRef` (where the secrets are
and which Vault versions were read) and resolve it here. Nothing in this module is ever a workflow
input, result, log line or trace entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from delivery.models import CredentialsRef


@dataclass(frozen=True)
class SpapiSecrets:
    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)
    seller_id: str
    marketplace_id: str
    region: str


class SecretSource(Protocol):
    async def spapi_secrets(self, ref: CredentialsRef) -> SpapiSecrets:
        """The secrets `ref` points at (from the worker's cache, re-reading Vault on a miss)."""
        ...
