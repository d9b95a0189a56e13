"""`spapi_send`: deliver a reply through Amazon SP-API Messaging (ARCHITECTURE §2).

One call is one attempt (the workflow drives the retries): check the text against the message-type
rules, get an LWA access token (cached, one refresh per tenant at a time), read the order's allowed
message types (cached), pick one by preference, POST it. Every failure leaves as a taxonomy error of
`delivery.failures`; `classify` is the HTTP status -> failure table, `classify_lwa` the one for LWA.
Secrets and access tokens never appear in an error, a log line or a heartbeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeats import while_heartbeating
from delivery.failures import AMBIGUOUS, PERMANENT, THROTTLED, TRANSIENT, ambiguous, permanent, throttled, transient
from delivery.models import CredentialsRef, SpapiSendInput, SpapiSendResult
from delivery.secrets import SecretSource, SpapiSecrets
from delivery.settings import SpapiSettings

ENDPOINTS = {
    "na": "https://sellingpartnerapi-na.amazon.com",
    "eu": "https://sellingpartnerapi-eu.amazon.com",
    "fe": "https://sellingpartnerapi-fe.amazon.com",
}
# Marketplace id -> region (https://developer-docs.amazon.com/sp-api/docs/marketplace-ids).
MARKETPLACE_REGIONS = {
    **dict.fromkeys(["A2EUQ1WTGCTBG2", "ATVPDKIKX0DER", "A1AM78C64UM0Y8", "A2Q3Y263D00KWC"], "na"),
    **dict.fromkeys(["A28R8C7NBKEWEA", "A1RKKUPIHCS9HS", "A1F83G8C2ARO7P", "A13V1IB3VIYZZH", "AMEN7PMS3EDWL",
                     "A1805IZSGTT6HS", "A1PA6795UKMFR9", "APJ6JRA9NG5V4", "A2NODRKZP88ZB9", "AE08WJ6YKNBMC",
                     "A1C3SOZRARQ6R3", "ARBP9OOSHTCHU", "A33AVAJ2PDY3EV", "A17E79C6D8DWNP", "A2VIGQ35RCS4UG",
                     "A21TJRUUN4KGV"], "eu"),
    **dict.fromkeys(["A19VAU5U5O7RUS", "A39IBJ37TRP1C6", "A1VC38T7YXB528"], "fe"),
}


class TextType(NamedTuple):
    operation_id: str  # the operation that sends it (and names its quota)
    max_chars: int  # the model's maxLength for `text`


# The message types that carry a text reply, by the name getMessagingActionsForOrder gives them.
TEXT_TYPES = {
    "confirmCustomizationDetails": TextType("confirmCustomizationDetails", 800),
    "confirmDeliveryDetails": TextType("createConfirmDeliveryDetails", 2000),
    "confirmOrderDetails": TextType("createConfirmOrderDetails", 2000),
    "confirmServiceDetails": TextType("createConfirmServiceDetails", 2000),
    "digitalAccessKey": TextType("createDigitalAccessKey", 400),
    "unexpectedProblem": TextType("createUnexpectedProblem", 2000),
}
GET_ACTIONS = "getMessagingActionsForOrder"
TEMPLATE_ERROR = "Invalid amazonOrderId and template combination"

TOKEN_REFRESH_MARGIN_S = 60.0  # Amazon's own SDK treats a token as expired 60 s early
MIN_THROTTLE_DELAY_S = 1.0
SEND_MARGIN_S = 2.0  # time kept in hand after a POST's own timeout, before the attempt's deadline
QUEUE_SLACK_S = 0.1  # a queued call goes this much after its slot: our clock and Amazon's are not one
ACTIONS_CACHE_MAX = 10_000

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_HTML = re.compile(
    r"<\s*/?\s*(?:a|abbr|b|big|blockquote|body|br|center|code|div|em|font|h[1-6]|head|hr|html|i|iframe|img|"
    r"li|link|meta|ol|p|pre|s|script|small|span|strike|strong|style|sub|sup|table|tbody|td|th|thead|title|"
    r"tr|u|ul)\b[^<>]*>|<!--|<!doctype|&(?:nbsp|amp|lt|gt|quot|apos|#\d+|#x[0-9a-f]+);",
    re.IGNORECASE,
)


# --- pure rules -----------------------------------------------------------------------------------


def endpoint_for(region: str, marketplace_id: str, override: str | None = None) -> str:
    """The SP-API host: the override (stand-in, sandbox), else the marketplace's region, else the tenant's."""
    if override:
        return override.rstrip("/")
    region = MARKETPLACE_REGIONS.get(marketplace_id, region).lower()
    if region not in ENDPOINTS:
        raise permanent(f"Unknown SP-API region {region!r} for marketplace {marketplace_id}", "configuration")
    return ENDPOINTS[region]


def check_text_rules(message_type: str, text: str) -> str | None:
    """The rule `text` breaks for `message_type` (model: length, no HTML, no email addresses), or None."""
    text_type = TEXT_TYPES.get(message_type)
    if text_type is None:
        return f"{message_type} is not a message type that carries a text reply"
    if not text.strip():
        return "text is empty"
    # Amazon's limit is most likely counted in UTF-16 units (a Java service): count the stricter way.
    length = len(text.encode("utf-16-le")) // 2
    if length > text_type.max_chars:
        return f"text is {length:,} characters; {message_type} allows at most {text_type.max_chars:,}"
    if _HTML.search(text):
        return "text contains HTML markup; SP-API messages are plain text"
    if _EMAIL.search(text):  # the address itself stays out of the message: it is personal data
        return "text contains an email address, which SP-API messages must not"
    return None


def candidate_types(text: str, preference: Sequence[str], pinned: str | None) -> list[str]:
    """The message types this text may go as, best first; permanent not_eligible when there are none."""
    wanted = [pinned] if pinned else list(preference)
    if not wanted:
        raise permanent("No SP-API message type is configured (message_type_preference is empty)", "configuration")
    broken = {message_type: check_text_rules(message_type, text) for message_type in wanted}
    fitting = [message_type for message_type in wanted if broken[message_type] is None]
    if not fitting:
        raise permanent(f"Reply is not SP-API eligible: {broken[wanted[0]]}", "not_eligible")
    return fitting


def action_names(payload: Any) -> list[str]:
    """The allowed action names of a getMessagingActionsForOrder answer (`_links.actions[].name`)."""
    links = payload.get("_links", {}).get("actions", []) if isinstance(payload, dict) else []
    names = []
    for link in links:
        name = link.get("name") or link.get("href", "").split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if name:
            names.append(name)
    return names


class Verdict(NamedTuple):
    kind: str  # a failure type of delivery.failures, or REFRESH_TOKEN
    reason: str | None = None  # for permanent failures


REFRESH_TOKEN = "refresh_token"  # not a failure yet: refresh the access token and try once more


def classify(outcome: int | httpx.TransportError, *, message: str = "", details: str = "",
             sending: bool = False, token_refreshed: bool = False) -> Verdict:
    """What an SP-API answer (or the lack of one) means. `sending`: the call was the message POST."""
    if isinstance(outcome, httpx.TransportError):
        if isinstance(outcome, httpx.UnsupportedProtocol):
            return Verdict(PERMANENT, "configuration")
        # The whole request went out and no answer came: Amazon may have accepted the message.
        lost_answer = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)
        return Verdict(AMBIGUOUS) if sending and isinstance(outcome, lost_answer) else Verdict(TRANSIENT)
    status = outcome
    if status == 403:
        if TEMPLATE_ERROR in message:
            return Verdict(PERMANENT, "not_eligible")
        if "access token" in f"{message} {details}".lower():  # missing, expired, "revoked, malformed or invalid"
            return Verdict(TRANSIENT) if token_refreshed else Verdict(REFRESH_TOKEN)
        return Verdict(PERMANENT, "configuration")  # access denied: role or app authorisation
    if status == 429:
        return Verdict(THROTTLED)
    if status >= 500:
        return Verdict(TRANSIENT)
    return Verdict(PERMANENT, "rejected")  # 400, 404, 413, 415 and anything else unexpected


def classify_lwa(status: int, error: str) -> Verdict:
    """What an LWA token answer that is not 200 means (`error` is the OAuth error code)."""
    if error == "invalid_grant":
        return Verdict(PERMANENT, "seller_revoked")
    if status == 429:
        return Verdict(THROTTLED)
    if status >= 500 or error in ("server_error", "temporarily_unavailable"):
        return Verdict(TRANSIENT)
    return Verdict(PERMANENT, "configuration")  # invalid_client, unauthorized_client, invalid_request, ...


def failure(verdict: Verdict, message: str, *, request_id: str | None = None,
            retry_after_s: float = MIN_THROTTLE_DELAY_S) -> ApplicationError:
    if verdict.kind == THROTTLED:
        return throttled(message, timedelta(seconds=retry_after_s), request_id=request_id)
    if verdict.kind == PERMANENT:
        return permanent(message, verdict.reason or "rejected", request_id=request_id)
    if verdict.kind == AMBIGUOUS:
        return ambiguous(message, request_id=request_id)
    return transient(message, request_id=request_id)


@dataclass(frozen=True)
class ApiError:
    """An SP-API error answer: `{"errors": [{"code", "message", "details"}]}`, or whatever came instead."""

    status: int
    code: str
    message: str
    details: str
    request_id: str | None

    @classmethod
    def of(cls, response: httpx.Response) -> ApiError:
        request_id = response.headers.get("x-amzn-RequestId")
        try:
            first = response.json()["errors"][0]
            return cls(response.status_code, str(first.get("code") or ""), str(first.get("message") or ""),
                       str(first.get("details") or ""), request_id)
        except (ValueError, LookupError, TypeError, AttributeError):  # no Amazon error body: a gateway page, say
            return cls(response.status_code, "", response.reason_phrase, "", request_id)

    def describe(self, operation: str) -> str:
        """A short sentence for the trace: "SP-API 500 InternalFailure: We encountered ... (request 1234)"."""
        text = " ".join(part for part in (self.message, self.details) if part)[:300]
        request = f" (request {self.request_id})" if self.request_id else ""
        return f"SP-API {self.status} {self.code or operation}: {text}{request}"


# --- local quota and token cache --------------------------------------------------------------------


class TokenBucket:
    """The usage-plan bucket, kept on our side so a burst for one seller queues instead of meeting 429s.

    Tokens may go below zero: each caller reserves the next free slot and sleeps until it.
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._updated = time.monotonic()

    def reserve(self, max_wait: float) -> float:
        """Seconds until the caller's slot. A wait beyond `max_wait` is returned but reserves nothing."""
        now = time.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        wait = max(0.0, (1.0 - self._tokens) / self.rate)
        if wait <= max_wait:
            self._tokens -= 1.0
        return wait


class LwaTokens:
    """LWA access tokens per (client id, refresh token), refreshed 60 s before they expire.

    One refresh at a time per key: concurrent deliveries of a tenant wait for it and share the result.
    """

    def __init__(self, http: httpx.AsyncClient, settings: SpapiSettings) -> None:
        self._http = http
        self._settings = settings
        self._cache: dict[str, tuple[str, float]] = {}  # key -> (access token, monotonic expiry)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def get(self, secrets: SpapiSecrets) -> str:
        key = self._key(secrets)
        token = self._cached(key)
        if token is None:
            async with self._locks[key]:
                token = self._cached(key)  # another delivery may have refreshed it while we waited
                if token is None:
                    token, expires_in = await self._grant(secrets)
                    self._cache[key] = (token, time.monotonic() + max(0.0, expires_in - TOKEN_REFRESH_MARGIN_S))
        return token

    def discard(self, secrets: SpapiSecrets, token: str) -> None:
        """Forget `token` (Amazon refused it); a newer token another delivery got stays."""
        key = self._key(secrets)
        if self._cache.get(key, ("", 0.0))[0] == token:
            del self._cache[key]

    @staticmethod
    def _key(secrets: SpapiSecrets) -> str:
        # A digest, so the refresh token is not held twice in memory or shown in a debugger's repr.
        return hashlib.sha256(f"{secrets.client_id}\0{secrets.refresh_token}".encode()).hexdigest()

    def _cached(self, key: str) -> str | None:
        token, expires_at = self._cache.get(key, ("", 0.0))
        return token if token and time.monotonic() < expires_at else None

    async def _grant(self, secrets: SpapiSecrets) -> tuple[str, float]:
        form = {"grant_type": "refresh_token", "refresh_token": secrets.refresh_token,
                "client_id": secrets.client_id, "client_secret": secrets.client_secret}
        activity.heartbeat("lwa")
        try:
            response = await while_heartbeating(
                self._http.post(self._settings.lwa_endpoint, data=form, timeout=self._settings.timeout_s,
                                headers={"user-agent": self._settings.user_agent}), lambda: "lwa")
        except httpx.TransportError as exc:  # a token request changes nothing: always safe to retry
            raise transient(f"LWA unreachable: {type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        if response.status_code == 200 and isinstance(body.get("access_token"), str):
            return body["access_token"], float(body.get("expires_in") or 3600)
        error = str(body.get("error") or "")
        verdict = classify_lwa(response.status_code, error)
        explanation = ("seller revoked or refresh token invalid" if verdict.reason == "seller_revoked"
                       else str(body.get("error_description") or "")[:200])
        message = f"LWA {response.status_code} {error or response.reason_phrase}: {explanation}".rstrip(": ")
        raise failure(verdict, message, request_id=response.headers.get("x-amzn-RequestId"))


# --- the activity -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    """What one spapi_send call works with."""

    secrets: SpapiSecrets
    base_url: str
    order_id: str
    marketplace_id: str
    deadline: float  # monotonic time at which Temporal times this attempt out (inf: no timeout)

    @property
    def actions_key(self) -> tuple[str, str, str]:
        return self.secrets.seller_id, self.marketplace_id, self.order_id

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


class SpapiActivities:
    """SP-API Messaging for the worker. One instance per worker: its caches and quotas are shared."""

    def __init__(self, http: httpx.AsyncClient, secrets: SecretSource, settings: SpapiSettings) -> None:
        self._http = http
        self._secrets = secrets
        self._settings = settings
        self._tokens = LwaTokens(http, settings)
        self._actions: dict[tuple[str, str, str], tuple[list[str], float]] = {}
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._rate_limits: dict[tuple[str, str], float] = {}  # from x-amzn-RateLimit-Limit

    @activity.defn
    async def spapi_send(self, input: SpapiSendInput) -> SpapiSendResult:
        """Send `input.text` as the best message type the order allows; raises taxonomy errors only."""
        # The text rules come first: a reply SP-API cannot carry costs no HTTP call.
        candidates = candidate_types(input.text, self._settings.message_type_preference, input.message_type)
        attempt = await self._begin(input)
        allowed = await self._allowed_actions(attempt)
        message_type = next((candidate for candidate in candidates if candidate in allowed), None)
        if message_type is None:
            raise permanent(self._not_allowed(input, candidates, allowed), "not_eligible")
        response = await self._request(attempt, TEXT_TYPES[message_type].operation_id, "POST",
                                       f"/messages/{message_type}", {"text": input.text})
        self._actions.pop(attempt.actions_key, None)  # a sent message can change what the order allows
        return SpapiSendResult(message_type=message_type, request_id=response.headers.get("x-amzn-RequestId"))

    async def _begin(self, input: SpapiSendInput) -> _Attempt:
        secrets = await self._read_secrets(input.credentials)
        timeout = activity.info().start_to_close_timeout
        deadline = time.monotonic() + timeout.total_seconds() if timeout else math.inf
        base_url = endpoint_for(input.credentials.region, input.marketplace_id, self._settings.endpoint)
        return _Attempt(secrets, base_url, input.order_id, input.marketplace_id, deadline)

    async def _read_secrets(self, ref: CredentialsRef) -> SpapiSecrets:
        try:
            return await self._secrets.spapi_secrets(ref)
        except ApplicationError:
            raise
        except Exception as exc:  # the source's own trouble: name only its type, its text might quote a secret
            raise transient(f"Could not read the SP-API secrets of tenant {ref.tenant_id}: "
                            f"{type(exc).__name__}") from None

    @staticmethod
    def _not_allowed(input: SpapiSendInput, candidates: list[str], allowed: list[str]) -> str:
        allowed_text = ", ".join(allowed) or "none"
        if input.message_type:
            return (f"Message type {input.message_type} is not allowed for order {input.order_id} "
                    f"(allowed: {allowed_text})")
        return (f"Order {input.order_id} allows none of the message types this reply may use "
                f"({', '.join(candidates)}); allowed: {allowed_text}")

    async def _allowed_actions(self, attempt: _Attempt) -> list[str]:
        cached = self._actions.get(attempt.actions_key)
        if cached and time.monotonic() < cached[1]:
            return cached[0]
        response = await self._request(attempt, GET_ACTIONS, "GET", "")
        try:
            allowed = action_names(response.json())
        except ValueError:
            raise transient(f"SP-API {GET_ACTIONS}: the answer is not JSON "
                            f"(request {response.headers.get('x-amzn-RequestId')})") from None
        self._remember_actions(attempt, allowed)
        return allowed

    def _remember_actions(self, attempt: _Attempt, allowed: list[str]) -> None:
        now = time.monotonic()
        if len(self._actions) >= ACTIONS_CACHE_MAX:
            self._actions = {key: value for key, value in self._actions.items() if value[1] > now}
            if len(self._actions) >= ACTIONS_CACHE_MAX:
                self._actions.clear()
        self._actions[attempt.actions_key] = (allowed, now + self._settings.actions_cache_ttl_s)

    async def _request(self, attempt: _Attempt, operation: str, method: str, suffix: str,
                       body: dict[str, Any] | None = None) -> httpx.Response:
        """One SP-API call, and one more with a fresh token if Amazon refused the access token."""
        sending = method == "POST"
        url = f"{attempt.base_url}/messaging/v1/orders/{attempt.order_id}{suffix}"
        for token_refreshed in (False, True):
            token = await self._tokens.get(attempt.secrets)
            await self._wait_for_quota(attempt, operation)
            if sending and attempt.time_left() < self._settings.timeout_s + SEND_MARGIN_S:
                # Were the attempt to time out mid-POST, nobody could tell whether Amazon took the message.
                raise transient(f"SP-API {operation}: too little time left in this attempt to send safely")
            activity.heartbeat(operation)
            try:
                response = await while_heartbeating(self._http.request(
                    method, url, params={"marketplaceIds": attempt.marketplace_id}, json=body,
                    headers=self._headers(token), timeout=self._settings.timeout_s), lambda: operation)
            except asyncio.CancelledError:
                if sending:
                    # Cut mid-POST (an operator action, a cancelled delivery): Amazon may have the message.
                    raise ambiguous(f"SP-API {operation}: cancelled while the message was being sent; it may "
                                    "have been accepted") from None
                raise
            except httpx.TransportError as exc:
                verdict = classify(exc, sending=sending)
                outcome = ("no answer after the request was sent; the message may have been accepted"
                           if verdict.kind == AMBIGUOUS else "request failed")
                raise failure(verdict, f"SP-API {operation}: {outcome} ({type(exc).__name__})") from None
            self._note_rate_limit(attempt, operation, response)
            if response.is_success:
                return response
            error = ApiError.of(response)
            verdict = classify(response.status_code, message=error.message, details=error.details,
                               sending=sending, token_refreshed=token_refreshed)
            if verdict.kind == REFRESH_TOKEN:
                self._tokens.discard(attempt.secrets, token)
                continue
            if verdict.reason == "not_eligible":
                self._actions.pop(attempt.actions_key, None)  # what we cached is out of date
            raise failure(verdict, error.describe(operation), request_id=error.request_id,
                          retry_after_s=self._retry_after(attempt, operation))
        raise AssertionError("unreachable: the second pass never asks for another refresh")

    def _headers(self, token: str) -> dict[str, str]:
        return {
            "x-amz-access-token": token,
            "x-amz-date": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
            "user-agent": self._settings.user_agent,
            "accept": "application/hal+json, application/json",
        }

    async def _wait_for_quota(self, attempt: _Attempt, operation: str) -> None:
        if not self._settings.local_throttle:
            return
        key = (attempt.secrets.seller_id, operation)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._settings.rate_per_s, self._settings.burst)
        # Wait in the worker only as long as the attempt can afford; beyond that the workflow waits.
        affordable = max(0.0, min(self._settings.max_local_wait_s,
                                  attempt.time_left() - self._settings.timeout_s - SEND_MARGIN_S))
        wait = bucket.reserve(affordable)
        if wait > affordable:
            raise throttled(f"SP-API {operation}: local quota for seller {attempt.secrets.seller_id} is used up; "
                            f"next slot in {wait:.1f} s", timedelta(seconds=max(wait, MIN_THROTTLE_DELAY_S)))
        if wait > 0:
            await asyncio.sleep(wait + QUEUE_SLACK_S)

    def _note_rate_limit(self, attempt: _Attempt, operation: str, response: httpx.Response) -> None:
        try:
            rate = float(response.headers.get("x-amzn-RateLimit-Limit", ""))
        except ValueError:
            return
        if rate > 0:
            self._rate_limits[(attempt.secrets.seller_id, operation)] = rate

    def _retry_after(self, attempt: _Attempt, operation: str) -> float:
        """After a 429: the time one token takes at the seller's plan (a 429 carries no rate header)."""
        rate = self._rate_limits.get((attempt.secrets.seller_id, operation), self._settings.rate_per_s)
        return max(MIN_THROTTLE_DELAY_S, 1.0 / rate)
