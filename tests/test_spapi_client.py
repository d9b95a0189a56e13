"""`spapi_send` against an in-process SP-API stand-in: what Amazon saw, and what the workflow gets back.

The activity runs in `ActivityEnvironment` with an attempt timeout like the workflow's; failures are
checked by taxonomy type (`ApplicationError.type`) and reason, as the workflow reads them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.spapi import (
    REFRESH_TOKEN,
    TEXT_TYPES,
    SpapiActivities,
    Verdict,
    check_text_rules,
    classify,
    classify_lwa,
    endpoint_for,
)
from delivery.failures import AMBIGUOUS, PERMANENT, THROTTLED, TRANSIENT, failure_details
from delivery.models import CredentialsRef, SpapiSendInput, SpapiSendResult
from delivery.secrets import SpapiSecrets
from delivery.settings import SpapiSettings
from devstack.spapi import SpapiStandIn

# Amazon's official Messaging model, byte for byte (also at ../shared/reference/; sha256 checked below).
MODEL_PATH = Path(__file__).resolve().parents[1] / "devstack" / "spapi-messaging.json"

APP, SECRET = "amzn1.application-oa2-client.test", "lwa-client-secret-123"
REFRESH, SELLER = "Atzr|refresh-token-456", "A3SELLER"
US = "ATVPDKIKX0DER"
ORDER = "111-2222222-3333333"
REPLY = "Your parcel leaves our warehouse today."
ATTEMPT_TIMEOUT = timedelta(seconds=60)  # the workflow's SP-API attempt timeout

MakeActivities = Callable[..., SpapiActivities]


class Secrets:
    """The worker's secret source, as SP-API sees it: one app, one seller."""

    async def spapi_secrets(self, ref: CredentialsRef) -> SpapiSecrets:
        return SpapiSecrets(client_id=APP, client_secret=SECRET, refresh_token=REFRESH, seller_id=ref.seller_id,
                            marketplace_id=ref.marketplace_id, region=ref.region)


def send_input(order_id: str = ORDER, text: str = REPLY, message_type: str | None = None) -> SpapiSendInput:
    credentials = CredentialsRef(tenant_id="acme", seller_id=SELLER, marketplace_id=US, region="na",
                                 app_version=1, tenant_version=1)
    return SpapiSendInput.model_validate({"delivery_id": "dlv-1", "credentials": credentials, "order_id": order_id,
                                          "marketplace_id": US, "text": text, "message_type": message_type})


async def send(activities: SpapiActivities, input: SpapiSendInput | None = None,
               attempt_timeout: timedelta = ATTEMPT_TIMEOUT) -> SpapiSendResult:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, start_to_close_timeout=attempt_timeout)
    result: SpapiSendResult = await env.run(activities.spapi_send, input or send_input())
    return result


async def send_failure(activities: SpapiActivities, input: SpapiSendInput | None = None,
                       attempt_timeout: timedelta = ATTEMPT_TIMEOUT) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await send(activities, input, attempt_timeout)
    error = caught.value
    text = f"{error.message} {json.dumps(failure_details(error))}"
    assert SECRET not in text and REFRESH not in text and "Atza|" not in text  # never a secret in the trace
    return error


async def deliver(activities: SpapiActivities, input: SpapiSendInput) -> SpapiSendResult:
    """What the workflow does with `throttled`: wait the delay it names, then try again."""
    while True:
        try:
            return await send(activities, input)
        except ApplicationError as error:
            if error.type != THROTTLED or error.next_retry_delay is None:
                raise
            await asyncio.sleep(error.next_retry_delay.total_seconds())


def messaging_calls(standin: SpapiStandIn, method: str | None = None) -> list[dict[str, Any]]:
    return [r for r in standin.requests() if r["operation"] != "lwa" and method in (None, r["method"])]


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def standin() -> Iterator[SpapiStandIn]:
    with SpapiStandIn() as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_standin(standin: SpapiStandIn) -> None:
    standin.reset()
    standin.register_app(APP, SECRET)
    standin.register_seller(REFRESH, SELLER)


@pytest.fixture
async def make_activities(standin: SpapiStandIn) -> AsyncIterator[MakeActivities]:
    clients: list[httpx.AsyncClient] = []

    def make(**settings: Any) -> SpapiActivities:
        http = httpx.AsyncClient()
        clients.append(http)
        settings = {"endpoint": standin.url, "lwa_endpoint": f"{standin.url}/auth/o2/token", **settings}
        return SpapiActivities(http, Secrets(), SpapiSettings(**settings))

    yield make
    for http in clients:
        await http.aclose()


@pytest.fixture
def activities(make_activities: MakeActivities) -> SpapiActivities:
    return make_activities()


# --- choosing the message type ---------------------------------------------------------------------


async def test_sends_the_first_preferred_type_the_order_allows(standin: SpapiStandIn,
                                                              activities: SpapiActivities) -> None:
    standin.set_order(ORDER, ["unexpectedProblem", "confirmDeliveryDetails"])

    result = await send(activities)

    assert result.message_type == "confirmDeliveryDetails"  # before unexpectedProblem in the preference
    [message] = standin.messages()
    assert (message["message_type"], message["text"], message["order_id"]) == ("confirmDeliveryDetails", REPLY, ORDER)
    assert (message["seller_id"], message["marketplace_id"]) == (SELLER, US)
    assert result.request_id == message["request_id"]


async def test_a_pinned_type_wins_when_the_order_allows_it(standin: SpapiStandIn,
                                                           activities: SpapiActivities) -> None:
    standin.set_order(ORDER, ["confirmOrderDetails", "unexpectedProblem"])

    result = await send(activities, send_input(message_type="unexpectedProblem"))

    assert result.message_type == "unexpectedProblem"
    assert [m["message_type"] for m in standin.messages()] == ["unexpectedProblem"]


async def test_the_preference_comes_from_settings(standin: SpapiStandIn, make_activities: MakeActivities) -> None:
    activities = make_activities(message_type_preference=["unexpectedProblem", "confirmOrderDetails"])
    assert (await send(activities)).message_type == "unexpectedProblem"


async def test_an_order_that_allows_nothing_is_not_eligible_without_a_post(standin: SpapiStandIn,
                                                                           activities: SpapiActivities) -> None:
    standin.set_order(ORDER, [])

    error = await send_failure(activities)

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "not_eligible")
    assert "allowed: none" in error.message
    assert messaging_calls(standin, "POST") == []


async def test_a_pinned_type_the_order_does_not_allow_is_not_eligible(standin: SpapiStandIn,
                                                                      activities: SpapiActivities) -> None:
    standin.set_order(ORDER, ["confirmOrderDetails", "unexpectedProblem"])

    error = await send_failure(activities, send_input(message_type="confirmDeliveryDetails"))

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "not_eligible")
    assert "confirmDeliveryDetails is not allowed" in error.message
    assert "allowed: confirmOrderDetails, unexpectedProblem" in error.message
    assert messaging_calls(standin, "POST") == []


@pytest.mark.parametrize(("text", "rule"), [
    ("x" * 2500, "text is 2,500 characters; confirmOrderDetails allows at most 2,000"),
    ("Write to me at jane.doe@example.com, thanks", "email address"),
    ("<p>Your parcel</p> leaves today", "HTML"),
])
async def test_a_reply_that_breaks_the_text_rules_costs_no_http_call(standin: SpapiStandIn,
                                                                     activities: SpapiActivities,
                                                                     text: str, rule: str) -> None:
    error = await send_failure(activities, send_input(text=text))

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "not_eligible")
    assert rule in error.message
    assert "jane.doe" not in error.message  # the buyer's text stays out of the trace
    assert standin.requests() == []


# --- Amazon's answers ------------------------------------------------------------------------------


async def test_500_is_transient_with_the_request_id(standin: SpapiStandIn, activities: SpapiActivities) -> None:
    standin.add_fault("createConfirmOrderDetails", status=500)

    error = await send_failure(activities)

    assert error.type == TRANSIENT
    request_id = messaging_calls(standin, "POST")[-1]["request_id"]
    assert failure_details(error)["request_id"] == request_id
    assert error.message == (f"SP-API 500 InternalFailure: We encountered an internal error. Please try again. "
                             f"(request {request_id})")


async def test_400_is_permanent_rejected(standin: SpapiStandIn, activities: SpapiActivities) -> None:
    standin.add_fault("createConfirmOrderDetails", status=400)

    error = await send_failure(activities)

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "rejected")
    assert error.message.startswith("SP-API 400 InvalidInput")


async def test_actions_are_cached_between_attempts_and_a_stale_list_ends_in_403_template(
        standin: SpapiStandIn, activities: SpapiActivities) -> None:
    standin.add_fault("createConfirmOrderDetails", status=503)
    assert (await send_failure(activities)).type == TRANSIENT  # actions now cached
    standin.set_order(ORDER, ["unexpectedProblem"])  # the order moved on meanwhile

    error = await send_failure(activities)

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "not_eligible")
    assert "Invalid amazonOrderId and template combination" in error.message
    assert len(messaging_calls(standin, "GET")) == 1
    assert (await send(activities)).message_type == "unexpectedProblem"  # the stale list was dropped


async def test_a_connection_dropped_after_the_post_is_ambiguous(standin: SpapiStandIn,
                                                                activities: SpapiActivities) -> None:
    standin.add_fault("createConfirmOrderDetails", mode="drop_after_request")

    error = await send_failure(activities)

    assert error.type == AMBIGUOUS
    assert "may have been accepted" in error.message
    assert len(standin.messages()) == 1  # and indeed Amazon had it


async def test_a_read_timeout_is_ambiguous_on_the_post_and_transient_on_the_get(
        standin: SpapiStandIn, make_activities: MakeActivities) -> None:
    activities = make_activities(timeout_s=0.2)
    standin.add_fault("getMessagingActionsForOrder", mode="delay", delay_s=0.5)
    assert (await send_failure(activities, attempt_timeout=timedelta(seconds=5))).type == TRANSIENT

    standin.add_fault("createConfirmOrderDetails", mode="delay", delay_s=0.5)
    assert (await send_failure(activities, attempt_timeout=timedelta(seconds=5))).type == AMBIGUOUS
    await eventually(lambda: len(standin.messages()) == 1)  # the late POST went through


async def test_no_route_to_amazon_is_transient(make_activities: MakeActivities) -> None:
    activities = make_activities(endpoint="http://127.0.0.1:9")
    assert (await send_failure(activities)).type == TRANSIENT


async def test_a_post_that_could_outlive_the_attempt_is_not_started(standin: SpapiStandIn,
                                                                    activities: SpapiActivities) -> None:
    error = await send_failure(activities, attempt_timeout=timedelta(seconds=5))  # < timeout_s (15 s) + margin

    assert error.type == TRANSIENT
    assert messaging_calls(standin, "POST") == []


# --- quotas ----------------------------------------------------------------------------------------


async def test_429_is_throttled_with_a_delay_from_the_rate_header(standin: SpapiStandIn,
                                                                  make_activities: MakeActivities) -> None:
    activities = make_activities(local_throttle=False)
    standin.set_quota(rate=0.5, burst=1)
    await send(activities)  # learns x-amzn-RateLimit-Limit: 0.5

    error = await send_failure(activities, send_input(order_id="111-2222222-4444444"))

    assert error.type == THROTTLED
    assert error.next_retry_delay == timedelta(seconds=2)
    assert error.message.startswith("SP-API 429 QuotaExceeded")


async def test_429_without_a_known_rate_waits_at_least_a_second(standin: SpapiStandIn,
                                                                activities: SpapiActivities) -> None:
    standin.add_fault("getMessagingActionsForOrder", status=429)

    error = await send_failure(activities)

    assert error.type == THROTTLED
    assert error.next_retry_delay is not None and error.next_retry_delay >= timedelta(seconds=1)


async def test_without_the_local_bucket_a_burst_meets_429s(standin: SpapiStandIn,
                                                           make_activities: MakeActivities) -> None:
    activities = make_activities(local_throttle=False)
    orders = [f"111-0000000-{n:07d}" for n in range(20)]

    outcomes = await asyncio.gather(*(send(activities, send_input(order)) for order in orders),
                                    return_exceptions=True)

    throttled = [o for o in outcomes if isinstance(o, ApplicationError) and o.type == THROTTLED]
    assert len(throttled) >= 10  # burst 5 of getMessagingActionsForOrder, then (nearly all) 429s
    assert len([r for r in standin.requests() if r["status"] == 429]) == len(throttled)


async def test_the_local_bucket_keeps_a_burst_for_one_seller_clear_of_429s(standin: SpapiStandIn,
                                                                          activities: SpapiActivities) -> None:
    standin.set_quota(rate=1.0, burst=5)
    orders = [f"111-0000000-{n:07d}" for n in range(20)]

    results = await asyncio.gather(*(deliver(activities, send_input(order)) for order in orders))

    assert len(results) == 20 and len(standin.messages()) == 20
    assert len([r for r in standin.requests() if r["status"] == 429]) <= 1


# --- LWA -------------------------------------------------------------------------------------------


async def test_an_expired_token_mid_run_is_refreshed_once(standin: SpapiStandIn,
                                                          activities: SpapiActivities) -> None:
    standin.add_fault("createConfirmOrderDetails", status=500)
    await send_failure(activities)  # a token and the order's actions are now cached
    standin.expire_access_tokens()

    result = await send(activities)

    assert result.message_type == "confirmOrderDetails"
    assert standin.lwa_calls() == 2
    assert [r["status"] for r in messaging_calls(standin, "POST")] == [500, 403, 201]


async def test_a_token_refused_again_after_a_refresh_is_transient(make_activities: MakeActivities) -> None:
    with SpapiStandIn(token_ttl_s=0) as short_lived:  # every token it grants has already expired
        short_lived.register_app(APP, SECRET)
        short_lived.register_seller(REFRESH, SELLER)
        activities = make_activities(endpoint=short_lived.url, lwa_endpoint=f"{short_lived.url}/auth/o2/token")

        error = await send_failure(activities)

        assert error.type == TRANSIENT
        assert "has expired" in error.message
        assert short_lived.lwa_calls() == 2  # one refresh, not a loop


async def test_a_revoked_seller_is_permanent(standin: SpapiStandIn, activities: SpapiActivities) -> None:
    standin.revoke_refresh_token(REFRESH)

    error = await send_failure(activities)

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "seller_revoked")
    assert "seller revoked or refresh token invalid" in error.message
    assert messaging_calls(standin) == []


async def test_a_wrong_client_secret_is_permanent_configuration(standin: SpapiStandIn,
                                                                activities: SpapiActivities) -> None:
    standin.register_app(APP, "rotated-secret")

    error = await send_failure(activities)

    assert (error.type, failure_details(error)["reason"]) == (PERMANENT, "configuration")
    assert error.message.startswith("LWA 401 invalid_client")


@pytest.mark.parametrize("lwa_down", ["500", "unreachable"])
async def test_lwa_trouble_is_transient(standin: SpapiStandIn, make_activities: MakeActivities,
                                        lwa_down: str) -> None:
    if lwa_down == "500":
        standin.add_fault("lwa", status=500)
        activities = make_activities()
    else:
        activities = make_activities(lwa_endpoint="http://127.0.0.1:9/auth/o2/token")

    assert (await send_failure(activities)).type == TRANSIENT


async def test_concurrent_sends_of_one_seller_share_one_token(standin: SpapiStandIn,
                                                              make_activities: MakeActivities) -> None:
    standin.set_quota(rate=1000.0, burst=1000)
    activities = make_activities(local_throttle=False)
    orders = [f"111-0000000-{n:07d}" for n in range(20)]

    await asyncio.gather(*(send(activities, send_input(order)) for order in orders))

    assert standin.lwa_calls() == 1
    assert len(standin.messages()) == 20


async def test_the_headers_amazon_asks_for_are_sent(standin: SpapiStandIn, activities: SpapiActivities) -> None:
    await send(activities)

    for request in messaging_calls(standin):
        assert request["user_agent"] == SpapiSettings().user_agent
        assert re.fullmatch(r"\d{8}T\d{6}Z", request["x_amz_date"])


# --- the pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "kwargs", "expected"), [
    (400, {}, Verdict(PERMANENT, "rejected")),
    (404, {}, Verdict(PERMANENT, "rejected")),
    (413, {"sending": True}, Verdict(PERMANENT, "rejected")),
    (415, {"sending": True}, Verdict(PERMANENT, "rejected")),
    (403, {"message": "Invalid amazonOrderId and template combination."}, Verdict(PERMANENT, "not_eligible")),
    (403, {"message": "Access to requested resource is denied."}, Verdict(PERMANENT, "configuration")),
    (403, {"details": "The access token you provided has expired."}, Verdict(REFRESH_TOKEN)),
    (403, {"details": "The access token you provided is revoked, malformed or invalid."}, Verdict(REFRESH_TOKEN)),
    (403, {"details": "Access token is missing in the request header."}, Verdict(REFRESH_TOKEN)),
    (403, {"details": "The access token you provided has expired.", "token_refreshed": True}, Verdict(TRANSIENT)),
    (429, {"sending": True}, Verdict(THROTTLED)),
    (500, {"sending": True}, Verdict(TRANSIENT)),
    (502, {}, Verdict(TRANSIENT)),
    (503, {"sending": True}, Verdict(TRANSIENT)),
    (504, {}, Verdict(TRANSIENT)),
    (httpx.ConnectError("refused"), {"sending": True}, Verdict(TRANSIENT)),
    (httpx.ConnectTimeout("slow"), {"sending": True}, Verdict(TRANSIENT)),
    (httpx.PoolTimeout("busy"), {"sending": True}, Verdict(TRANSIENT)),
    (httpx.WriteError("reset"), {"sending": True}, Verdict(TRANSIENT)),  # the request never got out whole
    (httpx.ReadTimeout("no answer"), {"sending": True}, Verdict(AMBIGUOUS)),
    (httpx.ReadError("reset"), {"sending": True}, Verdict(AMBIGUOUS)),
    (httpx.RemoteProtocolError("closed"), {"sending": True}, Verdict(AMBIGUOUS)),
    (httpx.ReadTimeout("no answer"), {"sending": False}, Verdict(TRANSIENT)),  # a GET is safe to repeat
    (httpx.RemoteProtocolError("closed"), {"sending": False}, Verdict(TRANSIENT)),
    (httpx.UnsupportedProtocol("ftp"), {}, Verdict(PERMANENT, "configuration")),
])
def test_status_mapping(outcome: int | httpx.TransportError, kwargs: dict[str, Any], expected: Verdict) -> None:
    assert classify(outcome, **kwargs) == expected


@pytest.mark.parametrize(("status", "error", "expected"), [
    (400, "invalid_grant", Verdict(PERMANENT, "seller_revoked")),
    (401, "invalid_client", Verdict(PERMANENT, "configuration")),
    (400, "unsupported_grant_type", Verdict(PERMANENT, "configuration")),
    (400, "invalid_request", Verdict(PERMANENT, "configuration")),
    (429, "", Verdict(THROTTLED)),
    (500, "server_error", Verdict(TRANSIENT)),
    (503, "temporarily_unavailable", Verdict(TRANSIENT)),
    (502, "", Verdict(TRANSIENT)),
])
def test_lwa_status_mapping(status: int, error: str, expected: Verdict) -> None:
    assert classify_lwa(status, error) == expected


@pytest.mark.parametrize(("message_type", "text", "rule"), [
    ("confirmOrderDetails", "x" * 2000, None),
    ("confirmOrderDetails", "x" * 2001, "text is 2,001 characters; confirmOrderDetails allows at most 2,000"),
    ("confirmCustomizationDetails", "x" * 801, "allows at most 800"),
    ("digitalAccessKey", "x" * 401, "allows at most 400"),
    ("confirmOrderDetails", "\U0001f600" * 1001, "text is 2,002 characters"),  # counted in UTF-16 units
    ("confirmOrderDetails", "   ", "text is empty"),
    ("confirmOrderDetails", "Call <b>now</b>", "HTML"),
    ("confirmOrderDetails", "Line one<br/>line two", "HTML"),
    ("confirmOrderDetails", "Fish &amp; chips", "HTML"),
    ("confirmOrderDetails", "Sizes: 3 < 5 > 4, and <3 from us", None),
    ("confirmOrderDetails", "Mail support@shop.example.co.uk", "email address"),
    ("confirmOrderDetails", "Order 111-2222222-3333333 ships @ 5pm", None),
    ("legalDisclosure", "Hello", "legalDisclosure is not a message type that carries a text reply"),
])
def test_text_rules(message_type: str, text: str, rule: str | None) -> None:
    broken = check_text_rules(message_type, text)
    if rule is None:
        assert broken is None
    else:
        assert broken is not None and rule in broken


def test_text_limits_are_the_models() -> None:
    model = json.loads(MODEL_PATH.read_text())
    operations = {op["operationId"]: op for methods in model["paths"].values() for op in methods.values()}
    for text_type in TEXT_TYPES.values():
        body = next(p for p in operations[text_type.operation_id]["parameters"] if p["in"] == "body")
        definition = model["definitions"][body["schema"]["$ref"].rsplit("/", 1)[-1]]
        assert definition["properties"]["text"]["maxLength"] == text_type.max_chars, text_type


@pytest.mark.parametrize(("region", "marketplace", "override", "expected"), [
    ("na", "ATVPDKIKX0DER", None, "https://sellingpartnerapi-na.amazon.com"),
    ("eu", "A1PA6795UKMFR9", None, "https://sellingpartnerapi-eu.amazon.com"),
    ("eu", "A1F83G8C2ARO7P", None, "https://sellingpartnerapi-eu.amazon.com"),
    ("fe", "A1VC38T7YXB528", None, "https://sellingpartnerapi-fe.amazon.com"),
    ("na", "A1VC38T7YXB528", None, "https://sellingpartnerapi-fe.amazon.com"),  # the order's marketplace decides
    ("eu", "AUNKNOWN12345", None, "https://sellingpartnerapi-eu.amazon.com"),  # else the tenant's region
    ("na", "ATVPDKIKX0DER", "https://sandbox.sellingpartnerapi-na.amazon.com/",
     "https://sandbox.sellingpartnerapi-na.amazon.com"),
])
def test_endpoint_for(region: str, marketplace: str, override: str | None, expected: str) -> None:
    assert endpoint_for(region, marketplace, override) == expected


def test_an_unknown_region_is_a_configuration_error() -> None:
    with pytest.raises(ApplicationError) as caught:
        endpoint_for("mars", "AUNKNOWN12345")
    assert failure_details(caught.value)["reason"] == "configuration"
