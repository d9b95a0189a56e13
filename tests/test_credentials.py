"""fetch_credentials and the worker's CredentialStore against the Vault stand-in, through hvac."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hvac.exceptions as vault_errors
import pytest
import requests
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.credentials import CredentialsActivities, CredentialStore, VaultSession, vault_failure
from delivery.failures import PERMANENT, TRANSIENT, failure_details
from delivery.models import CredentialsRef, CredentialsRequest
from delivery.settings import VaultSettings
from devstack.vault import VaultStandIn

ROOT = "root-token-secret-value"
APP_PATH = "keybuzz/amazon_spapi/app"
TENANT = "acme"
TENANT_PATH = f"keybuzz/tenants/{TENANT}/amazon_spapi"
APP = {"client_id": "amzn1.application-oa2-client.test", "client_secret": "app-client-secret-value",
       "application_id": "amzn1.sp.solution.test", "region": "eu"}
TENANT_SECRET = {"refresh_token": "Atzr|tenant-refresh-token-value", "seller_id": "A1SELLERACME",
                 "marketplace_id": "A13V1IB3VIYZZH", "region": "eu"}
ROLE_ID, SECRET_ID = "worker-role", "approle-secret-id-value"
SECRET_VALUES = (APP["client_secret"], TENANT_SECRET["refresh_token"], ROOT, SECRET_ID)


@pytest.fixture(scope="module")
def server() -> Iterator[VaultStandIn]:
    with VaultStandIn(root_token=ROOT) as standin:
        yield standin


@pytest.fixture
def vault(server: VaultStandIn) -> VaultStandIn:
    server.reset()
    server.add_approle(ROLE_ID, SECRET_ID)
    server.put_secret(APP_PATH, APP)
    server.put_secret(TENANT_PATH, TENANT_SECRET)
    return server


StoreFactory = Callable[..., CredentialStore]


@pytest.fixture
def make_store(vault: VaultStandIn) -> Iterator[StoreFactory]:
    """Stores on the stand-in with the root token unless told otherwise; closed after the test."""
    stores: list[CredentialStore] = []

    def make(**overrides: Any) -> CredentialStore:
        values: dict[str, Any] = {"addr": vault.url, "token": ROOT, "timeout_s": 2.0} | overrides
        store = CredentialStore(VaultSettings(**values))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


async def fetch(store: CredentialStore, tenant_id: str = TENANT, marketplace_id: str | None = None) -> CredentialsRef:
    request = CredentialsRequest(tenant_id=tenant_id, marketplace_id=marketplace_id)
    return await ActivityEnvironment().run(CredentialsActivities(store).fetch_credentials, request)


async def fetch_error(store: CredentialStore, tenant_id: str = TENANT) -> ApplicationError:
    request = CredentialsRequest.model_construct(tenant_id=tenant_id, marketplace_id=None)  # unvalidated
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(CredentialsActivities(store).fetch_credentials, request)
    return caught.value


def reason(error: ApplicationError) -> str | None:
    return failure_details(error).get("reason")


def paths_requested(vault: VaultStandIn, status: int | None = None) -> list[str]:
    return [r["path"] for r in vault.requests() if status is None or r["status"] == status]


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for value in SECRET_VALUES:
            assert value not in str(text), f"a secret value leaked into {text!r}"


def without(values: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in values.items() if k != key}


def error_texts(error: BaseException) -> list[str]:
    """The error's message, details and every cause: all of it goes into workflow history."""
    texts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        texts += [str(current), repr(current), repr(getattr(current, "details", ""))]
        current = current.__cause__
    return texts


# --- reading ----------------------------------------------------------------------------------------


async def test_token_auth_returns_a_reference_and_the_secrets_stay_in_the_store(make_store: StoreFactory) -> None:
    store = make_store()
    ref = await fetch(store)
    assert ref == CredentialsRef(tenant_id=TENANT, seller_id="A1SELLERACME", marketplace_id="A13V1IB3VIYZZH",
                                 region="eu", app_version=1, tenant_version=1)
    assert_no_secret(repr(ref), ref.model_dump_json())

    secrets = await store.spapi_secrets(ref)
    assert (secrets.client_id, secrets.client_secret, secrets.refresh_token) == (
        APP["client_id"], APP["client_secret"], TENANT_SECRET["refresh_token"])
    assert_no_secret(repr(secrets))


async def test_approle_auth_logs_in_and_reads(vault: VaultStandIn, make_store: StoreFactory) -> None:
    store = make_store(token=None, role_id=ROLE_ID, secret_id=SECRET_ID)
    assert (await fetch(store)).seller_id == "A1SELLERACME"
    assert paths_requested(vault, 200)[0] == "/v1/auth/approle/login"


async def test_a_wrong_approle_secret_is_a_configuration_error(make_store: StoreFactory) -> None:
    error = await fetch_error(make_store(token=None, role_id=ROLE_ID, secret_id="wrong"))
    assert (error.type, reason(error)) == (PERMANENT, "configuration")
    assert "invalid role or secret ID" in error.message
    assert_no_secret(*error_texts(error))


@pytest.mark.parametrize(("tenant_region", "app_region", "expected"), [
    ("NA", "eu", "na"), (None, "eu-west-1", "eu"), ("us-west-2", None, "fe"), (None, "Far-East", "fe"),
])
async def test_the_region_is_the_tenants_else_the_apps_normalised(vault: VaultStandIn, make_store: StoreFactory,
                                                                  tenant_region: str | None, app_region: str | None,
                                                                  expected: str) -> None:
    vault.put_secret(APP_PATH, {**APP, "region": app_region} if app_region else without(APP, "region"))
    vault.put_secret(TENANT_PATH, {**TENANT_SECRET, "region": tenant_region} if tenant_region
                     else without(TENANT_SECRET, "region"))
    assert (await fetch(make_store())).region == expected


async def test_the_requests_marketplace_wins_over_the_tenants(make_store: StoreFactory) -> None:
    ref = await fetch(make_store(), marketplace_id="ATVPDKIKX0DER")
    assert ref.marketplace_id == "ATVPDKIKX0DER"


async def test_secrets_are_resolved_at_the_versions_the_reference_names(vault: VaultStandIn,
                                                                        make_store: StoreFactory) -> None:
    store = make_store(cache_ttl_s=0)
    old = await fetch(store)
    vault.put_secret(TENANT_PATH, {**TENANT_SECRET, "refresh_token": "Atzr|rotated"})

    new = await fetch(store)
    assert (old.tenant_version, new.tenant_version) == (1, 2)
    assert (await store.spapi_secrets(old)).refresh_token == TENANT_SECRET["refresh_token"]
    assert (await store.spapi_secrets(new)).refresh_token == "Atzr|rotated"


# --- auth over time ---------------------------------------------------------------------------------


async def test_a_token_near_the_end_of_its_lease_is_renewed(vault: VaultStandIn, make_store: StoreFactory) -> None:
    store = make_store(token=vault.create_token(ttl_s=2), cache_ttl_s=0)
    await fetch(store)  # lookup-self says ~1 s left: renewal is due after 2/3 of it
    await asyncio.sleep(0.8)
    await fetch(store)
    assert "/v1/auth/token/renew-self" in paths_requested(vault, 200)
    await asyncio.sleep(1.3)  # past the original expiry: the renewed token still reads
    await fetch(store)


async def test_an_approle_token_that_cannot_be_renewed_is_replaced_by_a_new_login(vault: VaultStandIn,
                                                                                  make_store: StoreFactory) -> None:
    vault.add_approle("short-role", "short-secret", token_ttl_s=1, renewable=False)
    store = make_store(token=None, role_id="short-role", secret_id="short-secret", cache_ttl_s=0)
    await fetch(store)
    await asyncio.sleep(0.8)  # past 2/3 of the lease
    await fetch(store)
    assert paths_requested(vault, 200).count("/v1/auth/approle/login") == 2
    assert paths_requested(vault, 403) == []  # replaced before it expired


async def test_a_revoked_approle_token_costs_one_login_and_one_retry(vault: VaultStandIn,
                                                                     make_store: StoreFactory) -> None:
    store = make_store(token=None, role_id=ROLE_ID, secret_id=SECRET_ID, cache_ttl_s=0)
    await fetch(store)
    for token in vault.tokens(ROLE_ID):
        vault.expire_token(token)

    assert (await fetch(store)).tenant_version == 1
    assert paths_requested(vault, 200).count("/v1/auth/approle/login") == 2
    assert paths_requested(vault, 403) == [f"/v1/secret/data/{TENANT_PATH}"]


async def test_an_expired_configured_token_is_a_configuration_error(vault: VaultStandIn,
                                                                    make_store: StoreFactory) -> None:
    token = vault.create_token(ttl_s=600)
    store = make_store(token=token, cache_ttl_s=0)
    await fetch(store)
    vault.expire_token(token)

    error = await fetch_error(store)
    assert (error.type, reason(error)) == (PERMANENT, "configuration")
    assert "invalid or expired" in error.message
    assert_no_secret(*error_texts(error))
    assert token not in " ".join(error_texts(error))


async def test_a_policy_denial_is_retried_once_then_a_configuration_error(vault: VaultStandIn,
                                                                          make_store: StoreFactory) -> None:
    store = make_store(token=vault.create_token(ttl_s=600, policies=["default"]))
    error = await fetch_error(store)
    assert (error.type, reason(error)) == (PERMANENT, "configuration")
    assert f"secret/{TENANT_PATH}" in error.message
    assert paths_requested(vault, 403) == [f"/v1/secret/data/{TENANT_PATH}"] * 2


async def test_vault_token_and_addr_from_the_environment_are_not_used(vault: VaultStandIn, make_store: StoreFactory,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    monkeypatch.setenv("VAULT_TOKEN", ROOT)
    monkeypatch.setenv("VAULT_ADDR", vault.url)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".vault-token").write_text(ROOT)

    store = make_store(token=None, addr="http://127.0.0.1:9")
    error = await fetch_error(store)
    assert (error.type, reason(error)) == (PERMANENT, "configuration")
    assert "no Vault auth configured" in error.message
    assert vault.requests() == []

    session = VaultSession(VaultSettings(addr=vault.url, role_id=ROLE_ID, secret_id=SecretStr(SECRET_ID)))
    assert not session.client.token  # hvac would have taken $VAULT_TOKEN
    session.close()


# --- missing credentials ----------------------------------------------------------------------------


async def test_a_tenant_without_an_amazon_connection_is_credentials_missing(vault: VaultStandIn,
                                                                            make_store: StoreFactory) -> None:
    error = await fetch_error(make_store(), tenant_id="bistro")
    assert (error.type, reason(error)) == (PERMANENT, "credentials_missing")
    assert "secret/keybuzz/tenants/bistro/amazon_spapi" in error.message


async def test_a_deleted_tenant_secret_is_credentials_missing(vault: VaultStandIn, make_store: StoreFactory) -> None:
    vault.delete_secret(TENANT_PATH)
    error = await fetch_error(make_store())
    assert (error.type, reason(error)) == (PERMANENT, "credentials_missing")
    assert f"no secret at secret/{TENANT_PATH} (missing or deleted)" in error.message
    assert_no_secret(*error_texts(error))


@pytest.mark.parametrize(("path", "key", "blank"), [
    (TENANT_PATH, "refresh_token", False), (TENANT_PATH, "seller_id", True), (APP_PATH, "client_secret", False),
])
async def test_a_missing_key_is_named(vault: VaultStandIn, make_store: StoreFactory, path: str, key: str,
                                      blank: bool) -> None:
    full = TENANT_SECRET if path == TENANT_PATH else APP
    vault.put_secret(path, {**full, key: ""} if blank else without(full, key))
    error = await fetch_error(make_store())
    assert (error.type, reason(error)) == (PERMANENT, "credentials_missing")
    assert f"'{key}'" in error.message and f"secret/{path}" in error.message
    assert failure_details(error)["missing_keys"] == [key]
    assert_no_secret(*error_texts(error))


async def test_no_marketplace_anywhere_is_credentials_missing(vault: VaultStandIn, make_store: StoreFactory) -> None:
    vault.put_secret(TENANT_PATH, without(TENANT_SECRET, "marketplace_id"))
    error = await fetch_error(make_store())
    assert reason(error) == "credentials_missing" and "marketplace_id" in error.message
    assert (await fetch(make_store(), marketplace_id="A1PA6795UKMFR9")).marketplace_id == "A1PA6795UKMFR9"


@pytest.mark.parametrize("tenant_id", ["../app", "../evil", "a/b", "", "x" * 64, "Acme", "acme\n", "-acme"])
async def test_a_tenant_id_that_is_not_a_slug_is_refused_before_any_request(vault: VaultStandIn,
                                                                            make_store: StoreFactory,
                                                                            tenant_id: str) -> None:
    store = make_store()
    error = await fetch_error(store, tenant_id=tenant_id)
    assert (error.type, reason(error)) == (PERMANENT, "invalid_tenant")
    with pytest.raises(ApplicationError, match="invalid tenant id"):
        await store.spapi_secrets(CredentialsRef.model_construct(
            tenant_id=tenant_id, seller_id="S", marketplace_id="M", region="eu", app_version=1, tenant_version=1))
    assert vault.requests() == []


# --- outages and the cache --------------------------------------------------------------------------


async def test_a_sealed_vault_without_a_cached_copy_is_transient(vault: VaultStandIn,
                                                                 make_store: StoreFactory) -> None:
    vault.seal()
    error = await fetch_error(make_store())
    assert error.type == TRANSIENT and not error.non_retryable
    assert "Vault is sealed" in error.message


async def test_a_sealed_vault_with_a_warm_cache_serves_it_within_the_grace_time(vault: VaultStandIn,
                                                                                make_store: StoreFactory) -> None:
    store = make_store(cache_ttl_s=0, outage_grace_s=60)
    fresh = await fetch(store)
    vault.seal()

    cached = await fetch(store)
    assert cached.served_from_cache_during_outage is True
    assert cached.model_copy(update={"served_from_cache_during_outage": False}) == fresh
    assert (await store.spapi_secrets(cached)).refresh_token == TENANT_SECRET["refresh_token"]
    assert 503 in {r["status"] for r in vault.requests()}  # it did ask Vault first


async def test_past_the_grace_time_an_outage_fails_even_with_a_cached_copy(vault: VaultStandIn,
                                                                           make_store: StoreFactory) -> None:
    store = make_store(cache_ttl_s=0, outage_grace_s=0)
    await fetch(store)
    vault.seal()
    assert (await fetch_error(store)).type == TRANSIENT


@pytest.mark.parametrize(("status", "mode", "words"), [
    (500, "http", "InternalServerError"), (502, "http", "BadGateway"), (429, "http", "rate limit"),
    (503, "http", "sealed"), (0, "drop", "cannot reach Vault"),
])
async def test_vault_errors_and_lost_connections_are_transient(vault: VaultStandIn, make_store: StoreFactory,
                                                               status: int, mode: str, words: str) -> None:
    vault.add_fault(status, times=1, path_regex="/data/", mode=mode)
    error = await fetch_error(make_store())
    assert error.type == TRANSIENT and words in error.message
    assert_no_secret(*error_texts(error))


async def test_concurrent_fetches_of_one_tenant_read_each_secret_once(vault: VaultStandIn,
                                                                      make_store: StoreFactory) -> None:
    store = make_store(cache_ttl_s=300)
    refs = await asyncio.gather(*(fetch(store) for _ in range(100)))
    assert len({ref.model_dump_json() for ref in refs}) == 1
    await store.spapi_secrets(refs[0])
    assert vault.read_count(APP_PATH) == 1 and vault.read_count(TENANT_PATH) == 1


async def test_after_the_cache_ttl_vault_is_read_again(vault: VaultStandIn, make_store: StoreFactory) -> None:
    store = make_store(cache_ttl_s=0.5)
    started = time.monotonic()
    await fetch(store)
    await fetch(store)
    assert vault.read_count(TENANT_PATH) == 1

    deadline = started + 5
    while vault.read_count(TENANT_PATH) == 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        await fetch(store)
    assert vault.read_count(TENANT_PATH) == 2
    assert time.monotonic() - started >= 0.5  # not before the TTL was over


# --- the failure table ------------------------------------------------------------------------------


@pytest.mark.parametrize(("exception", "kind", "why"), [
    (vault_errors.InvalidPath(errors=[]), PERMANENT, "credentials_missing"),
    (vault_errors.InvalidPath(errors=['no handler for route "kv/data/x"']), PERMANENT, "configuration"),
    (vault_errors.Forbidden(errors=["permission denied"]), PERMANENT, "configuration"),
    (vault_errors.InvalidRequest(errors=["invalid role or secret ID"]), PERMANENT, "configuration"),
    (vault_errors.Unauthorized(errors=["no"]), PERMANENT, "configuration"),
    (vault_errors.VaultDown(errors=["Vault is sealed"]), TRANSIENT, None),
    (vault_errors.VaultDown(errors=["node is not active"]), TRANSIENT, None),
    (vault_errors.RateLimitExceeded(errors=["rate limit quota exceeded"]), TRANSIENT, None),
    (vault_errors.InternalServerError(errors=["internal error"]), TRANSIENT, None),
    (vault_errors.BadGateway(errors=[]), TRANSIENT, None),
    (vault_errors.VaultNotInitialized(errors=[]), TRANSIENT, None),
    (vault_errors.UnexpectedError(errors=[]), TRANSIENT, None),
    (requests.ConnectionError("refused"), TRANSIENT, None),
    (requests.Timeout("slow"), TRANSIENT, None),
])
def test_each_vault_error_has_its_failure_class(exception: Exception, kind: str, why: str | None) -> None:
    error = vault_failure(exception, "secret/some/path", "http://vault:8200")
    assert (error.type, reason(error)) == (kind, why)
    assert error.non_retryable == (kind == PERMANENT)
