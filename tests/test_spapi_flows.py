"""SP-API acceptance (issue 3): message types, eligibility, quotas, access tokens, LWA caching.

End to end on the Temporal dev server with the stand-ins: what Amazon's stand-in saw (messages,
requests, LWA grants), what the SMTP sink received, and the delivery's trace.
"""

from __future__ import annotations

import asyncio

from temporalio.testing import WorkflowEnvironment

from delivery.models import DeliveryTrace
from delivery.settings import Settings
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from tests.conftest import ORDER_ID, REFRESH_TOKEN, RELAY_ADDRESS, Deliveries, worker_with

ACTIONS = "getMessagingActionsForOrder"


def order_ids(count: int) -> list[str]:
    """`count` distinct 3-7-7 order ids of one seller."""
    return [f"402-{1000000 + n:07d}-7654321" for n in range(count)]


def posts(spapi: SpapiStandIn) -> list[dict[str, object]]:
    return [r for r in spapi.requests() if r["method"] == "POST" and str(r["path"]).startswith("/messaging/")]


def statuses(spapi: SpapiStandIn, status: int) -> list[dict[str, object]]:
    return [r for r in spapi.requests() if r["status"] == status]


def step_outcomes(trace: DeliveryTrace, step: str) -> list[tuple[str, int | None]]:
    return [(e.outcome, e.attempt) for e in trace.events if e.step == step]


def with_spapi(settings: Settings, **changes: object) -> Settings:
    return settings.model_copy(update={"spapi": settings.spapi.model_copy(update=changes)})


# --- 1. message types and eligibility ----------------------------------------------------------


async def test_an_order_allowing_only_unexpected_problem_gets_unexpected_problem(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.set_order(ORDER_ID, actions=["unexpectedProblem"])

    trace = await deliveries.deliver(order_ref=ORDER_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    assert trace.spapi_message_type == "unexpectedProblem"
    assert [(m["order_id"], m["message_type"]) for m in spapi.messages()] == [(ORDER_ID, "unexpectedProblem")]
    [sent] = posts(spapi)
    assert sent["path"] == f"/messaging/v1/orders/{ORDER_ID}/messages/unexpectedProblem"
    assert sent["request_id"] == trace.spapi_request_id
    assert smtp.messages() == []


async def test_an_order_allowing_nothing_goes_by_smtp_and_the_note_says_why(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.set_order(ORDER_ID, actions=[])

    trace = await deliveries.deliver(order_ref=ORDER_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note is not None
    assert f"Order {ORDER_ID} allows none of the message types" in trace.note
    assert "allowed: none" in trace.note
    assert step_outcomes(trace, "spapi_send") == [("permanent", 1)]  # asked once, not retried
    assert [r["operation"] for r in spapi.requests()] == ["lwa", ACTIONS]  # looked, never posted
    assert spapi.messages() == []
    [mail] = smtp.messages()
    assert mail["rcpt_tos"] == [RELAY_ADDRESS]
    assert mail["message_id"] == trace.email_message_id


LONG_REPLY = ("Dear customer, here is everything about your parcel. " * 50)[:2500]
REPLY_WITH_ADDRESS = "Hello, for the invoice please write to billing.team@acme-shop.example and we send it."


async def test_a_reply_of_2500_characters_goes_by_smtp_without_any_spapi_post(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    assert len(LONG_REPLY) == 2500

    trace = await deliveries.deliver(order_ref=ORDER_ID, body_text=LONG_REPLY)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note is not None and "not SP-API eligible" in trace.note
    assert "2,500 characters" in trace.note
    assert step_outcomes(trace, "spapi_send") == [("permanent", 1)]
    assert posts(spapi) == [] and spapi.messages() == []
    [mail] = smtp.messages()
    assert mail["text"].rstrip("\n") == LONG_REPLY  # the whole reply, by mail


async def test_a_reply_containing_an_email_address_goes_by_smtp_without_any_spapi_post(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    trace = await deliveries.deliver(order_ref=ORDER_ID, body_text=REPLY_WITH_ADDRESS)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note is not None and "contains an email address" in trace.note
    assert "billing.team@acme-shop.example" not in trace.note  # the address is personal data: not quoted
    assert step_outcomes(trace, "spapi_send") == [("permanent", 1)]
    assert posts(spapi) == [] and spapi.messages() == []
    [mail] = smtp.messages()
    assert mail["text"].rstrip("\n") == REPLY_WITH_ADDRESS


# --- 2. the quota: 20 replies of one tenant at once, at 1 request/s burst 5 --------------------------


async def deliver_at_once(deliveries: Deliveries, orders: list[str]) -> list[DeliveryTrace]:
    return list(await asyncio.gather(*(deliveries.deliver(order_ref=order) for order in orders)))


def assert_all_by_spapi(traces: list[DeliveryTrace], orders: list[str], spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    assert [(t.status, t.provider_final) for t in traces] == [("delivered", "SPAPI")] * len(orders)
    assert not any(e.outcome == "fallback" for t in traces for e in t.events)
    assert sorted(m["order_id"] for m in spapi.messages()) == sorted(orders)  # each once
    assert smtp.messages() == []


async def test_twenty_replies_at_once_queue_on_the_local_bucket_and_all_go_by_spapi(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.set_quota(rate=1, burst=5)
    orders = order_ids(20)

    traces = await deliver_at_once(deliveries, orders)

    assert_all_by_spapi(traces, orders, spapi, smtp)
    throttled_by_amazon = statuses(spapi, 429)
    assert len(throttled_by_amazon) <= 2, f"the local bucket let {len(throttled_by_amazon)} requests meet a 429"
    # Every 429 Amazon gave is in a trace as `throttled`, not as a failure.
    throttled_events = [e for t in traces for e in t.events if e.outcome == "throttled"]
    assert len(throttled_events) >= len(throttled_by_amazon)
    assert not any(e.outcome == "failed" for t in traces for e in t.events)
    assert spapi.lwa_calls() == 1


async def test_twenty_replies_at_once_without_the_local_bucket_meet_429s_and_still_all_go_by_spapi(
        temporal_env: WorkflowEnvironment, settings: Settings, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.set_quota(rate=1, burst=5)
    orders = order_ids(20)

    async with worker_with(temporal_env, with_spapi(settings, local_throttle=False), "no_local_bucket") as deliveries:
        traces = await deliver_at_once(deliveries, orders)

    assert_all_by_spapi(traces, orders, spapi, smtp)
    throttled_by_amazon = statuses(spapi, 429)
    assert len(throttled_by_amazon) > 2  # without the bucket a burst of 20 does meet Amazon's quota
    throttled_events = [e for t in traces for e in t.events if e.outcome == "throttled"]
    # Nothing throttles locally: each throttled event is one 429, each 429 one event (retried, never failed).
    assert len(throttled_events) == len(throttled_by_amazon)
    assert {e.step for e in throttled_events} == {"spapi_send"}
    assert all("retry in" in (e.detail or "") for e in throttled_events)
    assert not any(e.outcome == "failed" for t in traces for e in t.events)


# --- 3. access tokens -------------------------------------------------------------------------------


async def test_an_access_token_expired_between_deliveries_is_refreshed_once(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    first_order, second_order = order_ids(2)
    first = await deliveries.deliver(order_ref=first_order)
    assert spapi.lwa_calls() == 1

    spapi.expire_access_tokens()
    second = await deliveries.deliver(order_ref=second_order)

    assert first.provider_final == second.provider_final == "SPAPI"
    assert spapi.lwa_calls() == 2  # one refresh
    refused = statuses(spapi, 403)
    assert [(r["operation"], r["order_id"]) for r in refused] == [(ACTIONS, second_order)]  # refused once
    assert step_outcomes(second, "spapi_send") == [("ok", 1)]  # refreshed inside the one attempt
    assert [m["order_id"] for m in spapi.messages()] == [first_order, second_order]
    assert smtp.messages() == []


async def test_a_seller_who_revoked_the_app_gets_the_reply_by_smtp_and_the_note_says_so(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    first_order, second_order = order_ids(2)
    await deliveries.deliver(order_ref=first_order)

    spapi.revoke_refresh_token(REFRESH_TOKEN)
    spapi.expire_access_tokens()  # the access token issued before the revocation runs out
    trace = await deliveries.deliver(order_ref=second_order)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note is not None and "seller revoked" in trace.note
    assert step_outcomes(trace, "spapi_send") == [("permanent", 1)]  # no retry against a revocation
    lwa_answers = [r["status"] for r in spapi.requests() if r["operation"] == "lwa"]
    assert lwa_answers == [200, 400]
    assert [m["order_id"] for m in spapi.messages()] == [first_order]
    [mail] = smtp.messages()
    assert mail["rcpt_tos"] == [RELAY_ADDRESS]


# --- 5. one LWA grant for a tenant's many deliveries ---------------------------------------------


async def test_twenty_deliveries_of_one_tenant_ask_lwa_once(temporal_env: WorkflowEnvironment, settings: Settings,
                                                            spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    # A generous usage plan here (and on our side) so the twenty go at once: the token is the point.
    spapi.set_quota(rate=100, burst=100)
    fast = with_spapi(settings, rate_per_s=100, burst=100)
    orders = order_ids(20)

    async with worker_with(temporal_env, fast, "one_lwa_grant") as deliveries:
        traces = await deliver_at_once(deliveries, orders[:16])  # at once: they share one refresh
        traces += [await deliveries.deliver(order_ref=order) for order in orders[16:]]  # then one by one

    assert_all_by_spapi(traces, orders, spapi, smtp)
    assert spapi.lwa_calls() == 1
    assert [r["operation"] for r in spapi.requests()].count("lwa") == 1
