"""`fetch_credentials`: where a tenant's SP-API credentials are in Vault KV v2, as a `CredentialsRef`.

The secrets themselves never leave the worker: `fetch_credentials` returns the Vault versions it read,
and `spapi_send` resolves them through `CredentialStore.spapi_secrets` (the worker's cache, re-reading
Vault by version on a miss). One `CredentialStore` per worker holds the hvac client, its token and the
cache.

hvac is blocking, so every call runs in a thread (`asyncio.to_thread`); the threads share one client,
and everything that replaces its token (login, renewal, re-login after a 403) runs behind one lock.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import hvac
import hvac.exceptions as vault_errors
import requests
from temporalio import activity
from temporalio.exceptions import ApplicationError

from delivery.failures import TRANSIENT, permanent, transient
from delivery.models import TENANT_ID_PATTERN, CredentialsRef, CredentialsRequest
from delivery.secrets import SpapiSecrets
from delivery.settings import VaultSettings

log = logging.getLogger(__name__)

TENANT_ID_RE = re.compile(TENANT_ID_PATTERN)
APP_KEYS = ("client_id", "client_secret")  # what the app secret must hold (application_id is not used)
TENANT_KEYS = ("refresh_token", "seller_id")  # region and marketplace_id may come from elsewhere
Region = Literal["na", "eu", "fe"]
# SP-API's three selling regions, as written in secrets: short names or the AWS region of the endpoint.
REGIONS: dict[str, Region] = {
    "na": "na", "north-america": "na", "north_america": "na", "us-east-1": "na",
    "eu": "eu", "europe": "eu", "eu-west-1": "eu",
    "fe": "fe", "far-east": "fe", "far_east": "fe", "us-west-2": "fe",
}
NO_AUTH_MESSAGE = ("no Vault auth configured: set OUTBOUND_VAULT_TOKEN, or OUTBOUND_VAULT_ROLE_ID and "
                   "OUTBOUND_VAULT_SECRET_ID")

_CacheKey = tuple[str, int | None]  # (path, version); None is "the latest version"


class VaultAuthError(Exception):
    """Vault auth cannot work as configured (none set, AppRole refused, token invalid): an operator's fix."""


def vault_failure(exc: Exception, where: str, addr: str) -> ApplicationError:
    """A Vault or transport error as the failure taxonomy. `where` names the secret; never a value."""
    errors = ", ".join(getattr(exc, "errors", None) or [])
    if isinstance(exc, VaultAuthError):
        return permanent(str(exc), "configuration")
    if isinstance(exc, vault_errors.InvalidPath):
        if errors:  # "no handler for route ...": the mount is wrong, not the secret missing
            return permanent(f"Vault has no KV mount for {where}: {errors}", "configuration")
        return permanent(f"no secret at {where} (missing or deleted)", "credentials_missing")
    if isinstance(exc, vault_errors.Forbidden):
        return permanent(f"Vault denied access to {where} (403 again after re-authenticating): "
                         "check the policy of the Vault token or AppRole", "configuration")
    if isinstance(exc, vault_errors.VaultDown):
        if "sealed" in errors.lower():
            return transient(f"Vault is sealed (reading {where}): an operator must unseal it")
        return transient(f"Vault is unavailable (503) reading {where}: {errors or 'no detail'}")
    if isinstance(exc, vault_errors.RateLimitExceeded):
        return transient(f"Vault rate limit exceeded (429) reading {where}")
    if isinstance(exc, vault_errors.InvalidRequest | vault_errors.Unauthorized):
        return permanent(f"Vault refused the request for {where}: {errors or 'no detail'}", "configuration")
    if isinstance(exc, vault_errors.VaultError):  # 500, 501, 502, 412 and other statuses: Vault's trouble
        return transient(f"Vault error reading {where}: {type(exc).__name__}: {errors or 'no detail'}")
    if isinstance(exc, requests.Timeout):
        return transient(f"Vault at {addr} did not answer in time (reading {where})")
    if isinstance(exc, requests.RequestException):
        return transient(f"cannot reach Vault at {addr} (reading {where}): {type(exc).__name__}")
    if isinstance(exc, KeyError | TypeError | ValueError):
        return transient(f"unexpected answer from Vault reading {where}: {type(exc).__name__}")
    raise exc


class VaultSession:
    """The hvac client and its token: login, renewal at 2/3 of the lease, re-login on 403. Blocking."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        # hvac.Client takes $VAULT_TOKEN, then ~/.vault-token, when `token` is None, and $VAULT_ADDR when
        # `url` is empty. "" is "no token" to hvac (it only tests truthiness) and keeps those out.
        self.client = hvac.Client(url=settings.addr, token="", timeout=settings.timeout_s,
                                  namespace=settings.namespace)
        self._lock = threading.Lock()
        self._generation = 0  # bumped with every new token or lease: threads racing on a 403 re-login once
        self._authenticated = False
        self._renew_at: float | None = None  # monotonic; None: never (ttl 0) or not renewable by us
        self._renewable = False
        self._full_ttl_s = 0
        # Renewal also runs in the background: a worker idle past its token's lease must not find the
        # token expired at its next read (a configured token cannot log in again).
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None

    def read(self, path: str, version: int | None) -> tuple[dict[str, Any], int]:
        """The secret's key/values and version number; one re-authentication and retry on a 403."""
        generation = self._ensure_token()
        try:
            return self._read_once(path, version)
        except vault_errors.Forbidden:
            self._recover_from_forbidden(generation)
        return self._read_once(path, version)

    def close(self) -> None:
        self._closed.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.settings.timeout_s + 1)
        self.client.adapter.close()

    def _renew_in_background(self) -> None:
        failures = 0
        while True:
            renew_at = self._renew_at
            # Wake when renewal is due; look again at least every 5 s, since a login moves the lease.
            wait = 5.0 if renew_at is None else min(5.0, max(0.0, renew_at - time.monotonic()))
            if failures:
                wait = max(wait, min(30.0, 2.0 ** failures))  # Vault down: back off, reads retry too
            if self._closed.wait(wait):
                return
            if not self._renewal_due():
                continue
            with self._lock:
                if not self._renewal_due():
                    continue
                try:
                    self._renew_or_login()
                    failures = 0
                except Exception as exc:  # keep the thread alive; the read-time check is the backstop
                    failures += 1
                    log.warning("vault: background token renewal failed (%s); will try again", type(exc).__name__)

    def _read_once(self, path: str, version: int | None) -> tuple[dict[str, Any], int]:
        response = self.client.secrets.kv.v2.read_secret_version(
            path=path, version=version, mount_point=self.settings.kv_mount, raise_on_deleted_version=True)
        data = response["data"]
        return dict(data["data"] or {}), int(data["metadata"]["version"])

    def _ensure_token(self) -> int:
        if self._authenticated and not self._renewal_due():
            return self._generation
        with self._lock:
            if not self._authenticated:
                self._authenticate()
            elif self._renewal_due():
                self._renew_or_login()
            return self._generation

    def _renewal_due(self) -> bool:
        return self._renew_at is not None and time.monotonic() >= self._renew_at

    def _authenticate(self) -> None:
        # AppRole first when both are set: it can log in again, a configured token cannot.
        if self.settings.role_id:
            self._login()
        elif self.settings.token is not None and self.settings.token.get_secret_value():
            self._adopt_token()
        else:
            raise VaultAuthError(NO_AUTH_MESSAGE)

    def _login(self) -> None:
        secret_id = self.settings.secret_id.get_secret_value() if self.settings.secret_id else None
        try:
            response = self.client.auth.approle.login(role_id=self.settings.role_id, secret_id=secret_id,
                                                      mount_point=self.settings.approle_mount)
        except (vault_errors.InvalidRequest, vault_errors.Forbidden) as exc:
            reason = ", ".join(exc.errors or []) or str(exc)
            raise VaultAuthError(f"Vault AppRole login refused: {reason}") from exc
        auth = response["auth"]
        lease, renewable = int(auth["lease_duration"]), bool(auth["renewable"])
        self._set_lease(lease, renewable, full_ttl_s=lease)
        log.info("vault: logged in with AppRole (lease %ss, renewable %s)", lease, renewable)

    def _adopt_token(self) -> None:
        assert self.settings.token is not None
        self.client.token = self.settings.token.get_secret_value()
        try:
            data = self.client.auth.token.lookup_self()["data"]
        except vault_errors.Forbidden:
            # Invalid, or valid without lookup rights: reads will tell. No renewal without a known lease.
            log.warning("vault: lookup-self refused for the configured token; it will not be renewed")
            self._set_lease(0, False, full_ttl_s=0)
            return
        self._set_lease(int(data["ttl"]), bool(data["renewable"]), full_ttl_s=int(data["creation_ttl"] or 0))

    def _set_lease(self, ttl_s: int, renewable: bool, *, full_ttl_s: int) -> None:
        self._generation += 1
        self._authenticated = True
        self._renewable = renewable
        self._full_ttl_s = full_ttl_s
        # Renew at 2/3 of the lease, as Vault's own lifetime watcher does; a ttl of 0 never expires.
        self._renew_at = time.monotonic() + ttl_s * 2 / 3 if ttl_s > 0 else None
        if self._renew_at is not None and self._renewer is None and not self._closed.is_set():
            self._renewer = threading.Thread(target=self._renew_in_background, name="vault-token-renewal",
                                             daemon=True)
            self._renewer.start()

    def _renew_or_login(self) -> None:
        if self._renewable and self._renew():
            return
        if self.settings.role_id:
            self._login()
        else:
            # A configured token that cannot be renewed lives until it expires; the 403 then says so.
            self._renew_at = None

    def _renew(self) -> bool:
        """Renew the token; False when that did not give it a full new lease (refused, or max TTL reached)."""
        try:
            auth = self.client.auth.token.renew_self()["auth"]
        except (vault_errors.InvalidRequest, vault_errors.Forbidden) as exc:
            log.info("vault: token renewal refused: %s", ", ".join(exc.errors or []))
            return False
        lease = int(auth["lease_duration"])
        capped = lease < self._full_ttl_s
        if capped and self.settings.role_id:
            return False  # near its max TTL: a fresh login beats a shrinking lease
        self._set_lease(lease, bool(auth["renewable"]), full_ttl_s=self._full_ttl_s)
        log.info("vault: token renewed (lease %ss)", lease)
        return True

    def _recover_from_forbidden(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return  # another thread has replaced the token since our read started
            if self.settings.role_id:
                log.warning("vault: 403 on a read, logging in again")
                self._login()
            elif self.settings.token is not None:
                self._check_configured_token()

    def _check_configured_token(self) -> None:
        try:
            self.client.auth.token.lookup_self()
        except vault_errors.Forbidden as exc:
            raise VaultAuthError("the configured Vault token is invalid or expired (403 on lookup-self)") \
                from exc


@dataclass
class CachedSecret:
    values: dict[str, Any] = field(repr=False)
    version: int
    fetched_at: float  # monotonic


@dataclass(frozen=True)
class SecretRead:
    secret: CachedSecret
    stale: bool  # served from the cache because Vault is out of reach


class CredentialStore:
    """One per worker: the Vault session and a cache of secrets keyed by (path, version)."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self._vault = VaultSession(settings)
        self._cache: dict[_CacheKey, CachedSecret] = {}
        self._inflight: dict[_CacheKey, asyncio.Future[CachedSecret]] = {}
        if not (settings.role_id or settings.token):
            log.warning("vault: %s", NO_AUTH_MESSAGE)

    async def read_tenant(self, tenant_id: str, marketplace_id: str | None) -> CredentialsRef:
        """The latest app and tenant secrets, checked, as a reference (versions, never values)."""
        tenant_path, tenant, app = await self._read_checked(tenant_id, tenant_version=None, app_version=None)
        return CredentialsRef(
            tenant_id=tenant_id,
            seller_id=_value(tenant.secret.values, "seller_id"),
            marketplace_id=marketplace_id or self._marketplace(tenant.secret.values, tenant_path),
            region=self._region(tenant.secret.values, app.secret.values, tenant_path),
            app_version=app.secret.version,
            tenant_version=tenant.secret.version,
            served_from_cache_during_outage=tenant.stale or app.stale,
        )

    async def spapi_secrets(self, ref: CredentialsRef) -> SpapiSecrets:
        """The secrets at the versions `ref` names (delivery.secrets.SecretSource)."""
        _, tenant, app = await self._read_checked(ref.tenant_id, ref.tenant_version, ref.app_version)
        return SpapiSecrets(
            client_id=_value(app.secret.values, "client_id"),
            client_secret=_value(app.secret.values, "client_secret"),
            refresh_token=_value(tenant.secret.values, "refresh_token"),
            seller_id=ref.seller_id,
            marketplace_id=ref.marketplace_id,
            region=ref.region,
        )

    def close(self) -> None:
        self._vault.close()

    async def _read_checked(self, tenant_id: str, tenant_version: int | None,
                            app_version: int | None) -> tuple[str, SecretRead, SecretRead]:
        """The tenant's path, its secret and the app's (None: the latest version), with the keys required."""
        tenant_path = self._tenant_path(tenant_id)
        tenant = await self._read(tenant_path, tenant_version)
        app = await self._read(self.settings.app_path, app_version)
        self._require(tenant.secret.values, TENANT_KEYS, tenant_path)
        self._require(app.secret.values, APP_KEYS, self.settings.app_path)
        return tenant_path, tenant, app

    # --- paths and checks ------------------------------------------------------------------------

    def _tenant_path(self, tenant_id: str) -> str:
        # Defence in depth: the models validate too, but this string becomes part of a Vault path.
        if not isinstance(tenant_id, str) or not TENANT_ID_RE.fullmatch(tenant_id):
            shown = repr(tenant_id[:80]) if isinstance(tenant_id, str) else type(tenant_id).__name__
            raise permanent(f"invalid tenant id {shown}: expected a slug of a-z, 0-9, '_' and '-' "
                            "(at most 63 characters, starting with a letter or digit)", "invalid_tenant")
        return self.settings.tenant_path.replace("{tenant_id}", tenant_id)

    def _where(self, path: str, version: int | None = None) -> str:
        at = f"{self.settings.kv_mount}/{path}"
        return f"{at} (version {version})" if version is not None else at

    def _require(self, values: dict[str, Any], keys: Sequence[str], path: str) -> None:
        missing = [key for key in keys if not _text(values.get(key))]
        if missing:
            names = ", ".join(repr(key) for key in missing)
            raise permanent(f"{self._where(path)} has no {names}", "credentials_missing",
                            path=self._where(path), missing_keys=missing)

    def _marketplace(self, tenant: dict[str, Any], tenant_path: str) -> str:
        marketplace = _text(tenant.get("marketplace_id"))
        if not marketplace:
            raise permanent(f"no marketplace id: the request gives none and {self._where(tenant_path)} "
                            "has no 'marketplace_id'", "credentials_missing", missing_keys=["marketplace_id"])
        return marketplace

    def _region(self, tenant: dict[str, Any], app: dict[str, Any], tenant_path: str) -> Region:
        """The tenant's region, else the app's, as na/eu/fe."""
        raw = _text(tenant.get("region")) or _text(app.get("region"))
        tenant_at, app_at = self._where(tenant_path), self._where(self.settings.app_path)
        if not raw:
            raise permanent(f"no 'region' in {tenant_at} nor in {app_at}", "credentials_missing",
                            missing_keys=["region"])
        region = REGIONS.get(raw.lower())
        if region is None:
            raise permanent(f"the 'region' of {tenant_at} (or else {app_at}) is not na, eu or fe",
                            "credentials_missing")
        return region

    # --- the cache -------------------------------------------------------------------------------

    async def _read(self, path: str, version: int | None) -> SecretRead:
        """From the cache while fresh, else from Vault; in an outage, the cached copy for a grace time."""
        key = (path, version)
        cached = self._cache.get(key)
        age = time.monotonic() - cached.fetched_at if cached else 0.0
        if cached is not None and age < self.settings.cache_ttl_s:
            return SecretRead(cached, stale=False)
        try:
            return SecretRead(await self._fetch_once(key), stale=False)
        except ApplicationError as error:
            # Transient is the outage class (sealed, 5xx, 429, unreachable): a bounded stale read beats
            # failing a delivery over a secret that has almost surely not changed.
            if (error.type == TRANSIENT and cached is not None
                    and age < self.settings.cache_ttl_s + self.settings.outage_grace_s):
                log.warning("vault: %s; serving %s from the cache (%.0fs old)", error.message,
                            self._where(path), age)
                return SecretRead(cached, stale=True)
            raise

    async def _fetch_once(self, key: _CacheKey) -> CachedSecret:
        """Single flight: concurrent misses of one key share one Vault read."""
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._fetch(*key))
            self._inflight[key] = future
            future.add_done_callback(lambda done: self._forget_inflight(key, done))
        # Shielded: one caller's cancellation must not cancel the read the others wait for.
        return await asyncio.shield(future)

    def _forget_inflight(self, key: _CacheKey, done: asyncio.Future[CachedSecret]) -> None:
        self._inflight.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved here too, in case every waiter was cancelled

    async def _fetch(self, path: str, version: int | None) -> CachedSecret:
        try:
            values, number = await asyncio.to_thread(self._vault.read, path, version)
        except Exception as exc:
            raise vault_failure(exc, self._where(path, version), self.settings.addr) from exc
        secret = CachedSecret(values, number, time.monotonic())
        self._evict_expired()
        self._cache[(path, version)] = secret
        self._cache[(path, number)] = secret  # a later read pinned to this version is a hit
        return secret

    def _evict_expired(self) -> None:
        horizon = time.monotonic() - self.settings.cache_ttl_s - self.settings.outage_grace_s
        for key in [key for key, secret in self._cache.items() if secret.fetched_at < horizon]:
            del self._cache[key]


def _text(value: Any) -> str | None:
    """A usable string value of a secret key, else None (absent, empty, not a string)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def _value(values: dict[str, Any], key: str) -> str:
    """A key `_require` has checked."""
    text = _text(values.get(key))
    assert text is not None
    return text


class CredentialsActivities:
    def __init__(self, store: CredentialStore) -> None:
        self.store = store

    @activity.defn
    async def fetch_credentials(self, request: CredentialsRequest) -> CredentialsRef:
        ref = await self.store.read_tenant(request.tenant_id, request.marketplace_id)
        outage = " (from the cache: Vault unreachable)" if ref.served_from_cache_during_outage else ""
        activity.logger.info("credentials of tenant %s: app v%d, tenant v%d%s", ref.tenant_id,
                             ref.app_version, ref.tenant_version, outage)
        return ref
