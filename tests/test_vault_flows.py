"""Vault acceptance (issue 4): secrets stay out of the history and the trace table, a sealed Vault only
delays a delivery, missing credentials are named, tokens outlive their first lease, reads are cached.

End to end on the Temporal dev server with the stand-ins. Every delivery of this module is scanned for
the secret values the Vault stand-in holds.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import hvac
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from temporalio.testing import WorkflowEnvironment

from activities.trace_store import TraceStore, delivery_trace
from delivery.models import DeliveryTrace
from delivery.settings import Settings
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from devstack.vault import VaultStandIn
from tests.conftest import (
    ORDER_ID,
    REFRESH_TOKEN,
    RELAY_ADDRESS,
    SELLER_ID,
    TENANT,
    VAULT_TOKEN,
    Deliveries,
    readable_history,
    wait_for_trace,
    worker_with,
)

TENANT_PATH = f"keybuzz/tenants/{TENANT}/amazon_spapi"
APP_PATH = "keybuzz/amazon_spapi/app"
# What a CredentialsRef carries by design (ARCHITECTURE §3): not secrets, so not scanned for.
REFERENCE_KEYS = frozenset({"seller_id", "marketplace_id", "region"})
ROLE_ID = "delivery-worker"
ROLE_SECRET_ID = "approle-secret-id-S3cr3t"


# --- what the outside world holds -------------------------------------------------------------------


def vault_secret_values(vault: VaultStandIn) -> set[str]:
    """Every secret value the Vault stand-in holds (read through its API), and the Vault tokens in use."""
    client = hvac.Client(url=vault.url, token=VAULT_TOKEN)
    values = {VAULT_TOKEN, ROLE_SECRET_ID, *vault.tokens()}

    def walk(folder: str) -> None:
        listed = client.secrets.kv.v2.list_secrets(path=folder, mount_point="secret")
        for key in listed["data"]["keys"]:
            if key.endswith("/"):
                walk(folder + key)
                continue
            data = client.secrets.kv.v2.read_secret_version(path=folder + key, mount_point="secret",
                                                            raise_on_deleted_version=True)["data"]["data"]
            values.update(str(v) for k, v in data.items() if k not in REFERENCE_KEYS)

    walk("")
    assert {REFRESH_TOKEN, VAULT_TOKEN} <= values  # the scan below looks for the values that matter
    return values


async def trace_row_json(deliveries: Deliveries, delivery_id: str) -> str:
    """The delivery_trace row, every column, as the help-desk's database holds it."""
    store = TraceStore.from_url(deliveries.settings.trace.database_url)
    try:
        async with store.engine.connect() as conn:
            row = (await conn.execute(select(delivery_trace).where(delivery_trace.c.delivery_id == delivery_id))
                   ).mappings().one()
    finally:
        await store.close()
    return json.dumps(dict(row), default=str)


async def assert_no_secret_leaked(deliveries: Deliveries, vault: VaultStandIn, trace: DeliveryTrace,
                                  body_text: str) -> None:
    history = await deliveries.client.get_workflow_handle(trace.delivery_id).fetch_history()
    history_text = readable_history(history.to_json())
    row_text = await trace_row_json(deliveries, trace.delivery_id)
    # The scan sees into payloads: the reply's own text, which travels in them, is found.
    assert body_text in history_text
    assert trace.delivery_id in row_text
    for secret in vault_secret_values(vault):
        assert secret not in history_text, f"a Vault secret is in the history of {trace.delivery_id}"
        assert secret not in row_text, f"a Vault secret is in the delivery_trace row of {trace.delivery_id}"
    assert "Atza|" not in history_text + row_text, "an LWA access token leaked"


# --- helpers ---------------------------------------------------------------------------------------


def with_vault(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"vault": settings.vault.model_copy(update=changes)})




async def sleep_until(moment: float) -> None:
    """Time itself is what these stories are about (token lifetimes): wait for a monotonic moment."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


def step_outcomes(trace: DeliveryTrace, step: str) -> list[tuple[str, int | None]]:
    return [(e.outcome, e.attempt) for e in trace.events if e.step == step]


def vault_calls(vault: VaultStandIn, path: str) -> list[int | None]:
    return [r["status"] for r in vault.requests() if r["path"] == f"/v1/{path}"]


# --- 1. no secret in the history or the trace table, whatever the branch -----------------------------


async def test_no_vault_secret_reaches_the_history_or_the_trace_table_on_any_branch(
        deliveries: Deliveries, vault: VaultStandIn, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    vault.put_secret("keybuzz/tenants/globex/amazon_spapi", {"seller_id": "A2GLOBEX", "region": "eu"})
    branches: list[tuple[str, dict[str, Any]]] = [
        ("delivered by SP-API", {"order_ref": ORDER_ID}),
        ("no order id: SMTP fallback", {"subject": "Where is my parcel?"}),
        ("order allows nothing: refused, fallback", {"order_ref": "402-0000001-7654321"}),
        ("reply not eligible: fallback", {"order_ref": ORDER_ID, "body_text": "Write to me: jo@example.org"}),
        ("access token expired: refreshed", {"order_ref": "402-0000002-7654321"}),
        ("tenant without refresh token: fallback", {"order_ref": ORDER_ID, "tenant_id": "globex"}),
        ("email channel", {"channel": "email", "to": "buyer@example.org"}),
        ("seller revoked: fallback", {"order_ref": "402-0000003-7654321"}),
    ]
    spapi.set_order("402-0000001-7654321", actions=[])
    seen: set[tuple[str | None, str]] = set()
    for branch, fields in branches:
        if branch.startswith("access token expired"):
            spapi.expire_access_tokens()
        if branch.startswith("seller revoked"):
            spapi.revoke_refresh_token(REFRESH_TOKEN)
            spapi.expire_access_tokens()
        body_text = fields.setdefault("body_text", f"Hello, this is the reply for the branch {branch}.")
        trace = await deliveries.deliver(**fields)
        seen.add((trace.provider_final, trace.note or ""))
        await assert_no_secret_leaked(deliveries, vault, trace, body_text)

    # The branches did happen (each its own outcome), so the scan covered their error texts too.
    assert len(seen) == len(branches) - 1  # the refreshed token delivers like the first one
    notes = " | ".join(note for _, note in seen)
    for expected in ("No orderId", "allows none", "not SP-API eligible", "'refresh_token'", "seller revoked"):
        assert expected in notes


# --- 2. a sealed Vault delays a delivery; it does not divert it --------------------------------------


async def test_a_vault_sealed_when_a_delivery_starts_delays_it_until_unsealed(
        deliveries: Deliveries, vault: VaultStandIn, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    vault.seal(True)
    request = deliveries.request(order_ref=ORDER_ID)
    handle = await deliveries.start(request)
    await wait_for_trace(handle, lambda t: ("failed", 1) in step_outcomes(t, "fetch_credentials"))
    assert spapi.requests() == []  # nothing goes to Amazon without credentials

    vault.seal(False)  # within the 2 s backoff of the first attempt
    trace = await handle.result()
    await deliveries.check_trace_agrees(trace)

    assert (trace.status, trace.provider_final, trace.note) == ("delivered", "SPAPI", None)
    assert step_outcomes(trace, "fetch_credentials") == [("failed", 1), ("ok", 2)]
    [failed] = [e for e in trace.events if e.step == "fetch_credentials" and e.outcome == "failed"]
    assert failed.detail is not None and "Vault is sealed" in failed.detail and "retry in 2s" in failed.detail
    assert not any(e.outcome in ("fallback", "awaiting_action") for e in trace.events)
    assert 503 in [r["status"] for r in vault.requests()]  # it was sealed when asked
    assert [m["order_id"] for m in spapi.messages()] == [ORDER_ID]
    assert smtp.messages() == []
    await assert_no_secret_leaked(deliveries, vault, trace, deliveries.request().body_text)


# --- 3. a tenant without Amazon credentials -----------------------------------------------------------


@pytest.mark.parametrize(("secret", "named"), [
    (None, "no secret at secret/keybuzz/tenants/globex/amazon_spapi"),
    ({"seller_id": "A2GLOBEX", "marketplace_id": "A13V1IB3VIYZZH", "region": "eu"},
     "secret/keybuzz/tenants/globex/amazon_spapi has no 'refresh_token'"),
], ids=["no-secret", "no-refresh-token"])
async def test_a_tenant_without_amazon_credentials_gets_the_smtp_fallback_naming_them(
        deliveries: Deliveries, vault: VaultStandIn, spapi: SpapiStandIn, smtp: SmtpSink,
        secret: dict[str, str] | None, named: str) -> None:
    if secret is not None:
        vault.put_secret("keybuzz/tenants/globex/amazon_spapi", secret)

    trace = await deliveries.deliver(tenant_id="globex", order_ref=ORDER_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note is not None and trace.note.startswith("Amazon credentials unavailable")
    assert named in trace.note
    assert step_outcomes(trace, "fetch_credentials") == [("permanent", 1)]  # not retried
    assert spapi.requests() == []
    [mail] = smtp.messages()
    assert mail["rcpt_tos"] == [RELAY_ADDRESS]
    await assert_no_secret_leaked(deliveries, vault, trace, deliveries.request().body_text)


# --- 4. a Vault token expiring between deliveries -------------------------------------------------------


async def test_a_renewable_token_is_renewed_and_delivers_past_its_first_lease(
        temporal_env: WorkflowEnvironment, settings: Settings, vault: VaultStandIn, spapi: SpapiStandIn,
        smtp: SmtpSink) -> None:
    lease = 6.0
    issued = time.monotonic()
    token = vault.create_token(ttl_s=int(lease), renewable=True)
    # No secrets cache, so every delivery reads Vault with the token.
    short_lived = with_vault(settings, token=SecretStr(token), cache_ttl_s=0)
    traces = []
    async with worker_with(temporal_env, short_lived, "renewed_token") as deliveries:
        traces.append(await deliveries.deliver(order_ref=ORDER_ID))
        await sleep_until(issued + lease * 0.8)  # past 2/3 of the lease: the next read renews it
        traces.append(await deliveries.deliver(order_ref=ORDER_ID))
        await sleep_until(issued + lease + 0.5)  # the first lease is over
        traces.append(await deliveries.deliver(order_ref=ORDER_ID))

    assert [t.provider_final for t in traces] == ["SPAPI"] * 3
    assert all(step_outcomes(t, "fetch_credentials") == [("ok", 1)] for t in traces)
    assert 200 in vault_calls(vault, "auth/token/renew-self")
    assert 403 not in [r["status"] for r in vault.requests()]
    assert smtp.messages() == []
    await assert_no_secret_leaked(deliveries, vault, traces[-1], deliveries.request().body_text)


async def test_a_renewable_token_outlives_an_idle_spell_longer_than_its_lease(
        temporal_env: WorkflowEnvironment, settings: Settings, vault: VaultStandIn, spapi: SpapiStandIn,
        smtp: SmtpSink) -> None:
    # A quiet night for the worker: no delivery from one lease to past its end. Renewal at 2/3 of the
    # lease (as Vault's lifetime watcher does) keeps the token alive; a renewal that waits for the next
    # read finds it expired, and the tenant's Amazon replies would go by SMTP until someone restarts.
    lease = 3.0
    issued = time.monotonic()
    token = vault.create_token(ttl_s=int(lease), renewable=True)
    short_lived = with_vault(settings, token=SecretStr(token), cache_ttl_s=0)
    async with worker_with(temporal_env, short_lived, "idle_worker") as deliveries:
        before = await deliveries.deliver(order_ref=ORDER_ID)
        await sleep_until(issued + lease + 0.5)
        after = await deliveries.deliver(order_ref=ORDER_ID)

    assert before.provider_final == "SPAPI"
    assert (after.provider_final, after.note) == ("SPAPI", None), after.note
    assert smtp.messages() == []


async def test_an_approle_token_expired_between_deliveries_is_replaced_by_a_new_login(
        temporal_env: WorkflowEnvironment, settings: Settings, vault: VaultStandIn, spapi: SpapiStandIn,
        smtp: SmtpSink) -> None:
    vault.add_approle(ROLE_ID, ROLE_SECRET_ID, token_ttl_s=3600)
    approle = with_vault(settings, token=None, role_id=ROLE_ID, secret_id=SecretStr(ROLE_SECRET_ID),
                         cache_ttl_s=0)
    async with worker_with(temporal_env, approle, "approle") as deliveries:
        first = await deliveries.deliver(order_ref=ORDER_ID)
        [worker_token] = vault.tokens(role_id=ROLE_ID)
        vault.expire_token(worker_token)
        second = await deliveries.deliver(order_ref=ORDER_ID)

    assert first.provider_final == second.provider_final == "SPAPI"
    assert step_outcomes(second, "fetch_credentials") == [("ok", 1)]  # the re-login is inside the attempt
    assert vault_calls(vault, "auth/approle/login") == [200, 200]
    assert vault.tokens(role_id=ROLE_ID) != [worker_token]
    assert [m["order_id"] for m in spapi.messages()] == [ORDER_ID, ORDER_ID]
    assert smtp.messages() == []
    await assert_no_secret_leaked(deliveries, vault, second, deliveries.request().body_text)


# --- 6. reads are cached: 100 deliveries, one read of each secret -------------------------------------


async def test_a_hundred_deliveries_of_one_tenant_read_vault_at_most_twice_per_ttl_window(
        temporal_env: WorkflowEnvironment, settings: Settings, vault: VaultStandIn, spapi: SpapiStandIn,
        smtp: SmtpSink) -> None:
    # A generous SP-API plan (and the same on our side) so the hundred go at once: Vault is the point.
    spapi.set_quota(rate=1000, burst=1000)
    fast = settings.model_copy(update={"spapi": settings.spapi.model_copy(update={"rate_per_s": 1000,
                                                                                  "burst": 1000})})
    orders = [f"402-{2000000 + n:07d}-7654321" for n in range(100)]
    started = time.monotonic()
    async with worker_with(temporal_env, fast, "hundred") as deliveries:
        traces = await asyncio.gather(*(deliveries.deliver(order_ref=order) for order in orders))
    elapsed = time.monotonic() - started

    assert elapsed < settings.vault.cache_ttl_s  # all within one TTL window of the secrets cache
    assert [t.provider_final for t in traces] == ["SPAPI"] * 100
    assert sorted(m["order_id"] for m in spapi.messages()) == orders
    # Two secrets (the app's and the tenant's), each read once: at most two reads in the window.
    assert vault.read_count() <= 2, f"{vault.read_count()} Vault reads for 100 deliveries"
    assert vault.read_count(TENANT_PATH) == vault.read_count(APP_PATH) == 1
    assert {m["seller_id"] for m in spapi.messages()} == {SELLER_ID}
    assert smtp.messages() == []
