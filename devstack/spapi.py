"""A local stand-in for Amazon SP-API Messaging and Login with Amazon (LWA), built to the official model.

One HTTP port serves both: `POST /auth/o2/token` (LWA) and the eleven Messaging operations of
`devstack/spapi-messaging.json` (a copy of `reference/spapi-messaging.json`) under
`/messaging/v1/orders/{amazonOrderId}`. It keeps Amazon's
behaviour where the research brief documents it: access tokens checked on every call, one
marketplace id per call, 3-7-7 order ids, per-order allowed message types with the 403 "template
combination" error, body limits from the model, a token bucket per (seller, operation) answering 429,
`x-amzn-RequestId` on every answer and `x-amzn-RateLimit-Limit` only on 200/201/400/404.

Tests and the dev stack drive it through the Python API below or the same controls over HTTP under
`/_emulator/...`; faults (an error status, a delay, a response lost after the request was read) are
injected per operation. `python -m devstack.spapi --port N [--seed FILE]` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from devstack.emulator import EmulatorServer, Request, Response, control_endpoint, run_cli

ORDER_PATH = "/messaging/v1/orders/{order_id}"
LWA_PATH = "/auth/o2/token"
DEFAULT_ACTIONS = ("confirmOrderDetails", "confirmDeliveryDetails", "unexpectedProblem")
DEFAULT_RATE = 1.0
DEFAULT_BURST = 5
# No body limit is documented; 10 MB is what Amazon allows for messaging attachments.
MAX_BODY_BYTES = 10 * 1024 * 1024
FAULT_MODES = ("http", "delay", "drop_after_request")

ORDER_ID_RE = re.compile(r"^\d{3}-\d{7}-\d{7}$")
_MESSAGING_PATH_RE = re.compile(
    r"^/messaging/v1/orders/(?P<order>[^/]+)(?:(?P<attributes>/attributes)|/messages/(?P<action>[^/]+))?$")

# The model's static sandbox cases: this order succeeds with every type, that one answers 400.
SANDBOX_ORDER = "123-1234567-1234567"
SANDBOX_BAD_ORDER = "123-1234567-0000000"
# Types removed from the model (2025 and 2026) but still in older SDKs: Amazon refuses them as templates.
REMOVED_ACTIONS = frozenset({"negativeFeedbackRemoval", "amazonMotors"})


@dataclass(frozen=True)
class Operation:
    """One operation of the model and the body rules its request schema states."""

    operation_id: str
    method: str
    action: str = ""  # the path segment after /messages/, also the name in the actions list
    text_max: int | None = None  # the body carries `text`, 1..text_max characters
    attachments_max: int | None = None  # the body may carry `attachments`, at most this many
    attachments_min: int = 0  # > 0: attachments are required
    date_fields: tuple[str, ...] = ()


GET_ACTIONS = Operation("getMessagingActionsForOrder", "GET")
GET_ATTRIBUTES = Operation("GetAttributes", "GET")
LWA = Operation("lwa", "POST")
SEND_OPERATIONS = (
    Operation("confirmCustomizationDetails", "POST", "confirmCustomizationDetails",
              text_max=800, attachments_max=5),
    Operation("createConfirmDeliveryDetails", "POST", "confirmDeliveryDetails", text_max=2000),
    Operation("createLegalDisclosure", "POST", "legalDisclosure", attachments_max=5),
    Operation("createConfirmOrderDetails", "POST", "confirmOrderDetails", text_max=2000),
    Operation("createConfirmServiceDetails", "POST", "confirmServiceDetails", text_max=2000),
    Operation("CreateWarranty", "POST", "warranty", attachments_max=5, attachments_min=1,
              date_fields=("coverageStartDate", "coverageEndDate")),
    Operation("createDigitalAccessKey", "POST", "digitalAccessKey", text_max=400, attachments_max=5),
    Operation("createUnexpectedProblem", "POST", "unexpectedProblem", text_max=2000),
    Operation("sendInvoice", "POST", "invoice", attachments_max=5, attachments_min=1),
)
SENDS_BY_ACTION = {op.action: op for op in SEND_OPERATIONS}
OPERATIONS = (GET_ACTIONS, GET_ATTRIBUTES, *SEND_OPERATIONS)
# What the model's sandbox lists for its success order, less the types removed since.
SANDBOX_ACTIONS = (*(op.action for op in SEND_OPERATIONS if op.action != "invoice"), "attributes")

# Amazon's error texts (research brief §1.3). Codes for 404/413/415/503 are not documented: plausible names.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("InvalidInput", "Invalid Input"),
    403: ("Unauthorized", "Access to requested resource is denied."),
    404: ("NotFound", "The resource specified does not exist."),
    413: ("RequestEntityTooLarge", "The request size exceeded the maximum accepted size."),
    415: ("UnsupportedMediaType", "The request payload is in an unsupported format."),
    429: ("QuotaExceeded", "You exceeded your quota for the requested resource."),
    500: ("InternalFailure", "We encountered an internal error. Please try again."),
    503: ("ServiceUnavailable", "Temporary overloading or maintenance of the server."),
}
MARKETPLACE_ERROR = "marketplaceIds: Missing or invalid request parameter: marketplaceId"
TEMPLATE_ERROR = "Invalid amazonOrderId and template combination."
TOKEN_MISSING = "Access token is missing in the request header."
TOKEN_EXPIRED = "The access token you provided has expired."
TOKEN_INVALID = "The access token you provided is revoked, malformed or invalid."
# The model declares x-amzn-RateLimit-Limit only on these statuses.
RATE_LIMITED_STATUSES = frozenset({200, 201, 400, 404})

LWA_INVALID_GRANT = "The request has an invalid grant parameter : refresh_token"
LWA_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "The request is missing a required parameter or is otherwise malformed"),
    401: ("invalid_client", "Client authentication failed"),
    403: ("access_denied", "Access not permitted"),
    500: ("server_error", "The authorization server encountered an unexpected error"),
    503: ("temporarily_unavailable", "The authorization server is temporarily unavailable"),
}


def amazon_error(status: int, message: str | None = None, details: str = "", **headers: str) -> Response:
    code, default_message = ERRORS.get(status, ("InternalFailure", HTTPStatus(status).phrase))
    body = {"errors": [{"code": code, "message": message or default_message, "details": details}]}
    return Response.json(status, body, **headers)


LWA_HEADERS = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def lwa_error(status: int, error: str, description: str) -> Response:
    body = {"error_description": description, "error": error}
    return Response.json(status, body, "application/json;charset=UTF-8", **LWA_HEADERS)


def validate_body(op: Operation, body: Any) -> str | None:
    """Why `body` breaks `op`'s request schema (as the brief reads it), or None. Extra fields pass."""
    if not isinstance(body, dict):
        return "the request body must be a JSON object"
    if op.text_max is not None:
        text = body.get("text")
        if not isinstance(text, str) or not text:
            return "text: a non-empty string is required"
        if len(text) > op.text_max:
            return f"text: at most {op.text_max} characters"
    if op.attachments_max is not None:
        problem = _attachments_problem(body.get("attachments"), op)
        if problem:
            return problem
    for name in op.date_fields:
        if name in body and not _is_date_time(body[name]):
            return f"{name}: an ISO 8601 date-time is required"
    return None


def _attachments_problem(attachments: Any, op: Operation) -> str | None:
    if attachments is None:
        return "attachments: at least one attachment is required" if op.attachments_min else None
    if not isinstance(attachments, list):
        return "attachments: must be an array"
    if not op.attachments_min <= len(attachments) <= (op.attachments_max or 0):
        return f"attachments: {op.attachments_min} to {op.attachments_max} items"
    for item in attachments:
        if not (isinstance(item, dict) and isinstance(item.get("uploadDestinationId"), str)
                and isinstance(item.get("fileName"), str)):
            return "attachments: each needs uploadDestinationId and fileName strings"
    return None


def _is_date_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def body_schema(op: Operation) -> dict[str, Any]:
    """The JSON Schema (draft-04) an action's `_embedded.schema.payload` carries, as real responses do."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    if op.text_max is not None:
        properties["text"] = {"type": "string", "minLength": 1, "maxLength": op.text_max}
        required.append("text")
    if op.attachments_max is not None:
        item = {"type": "object", "required": ["uploadDestinationId", "fileName"],
                "properties": {"uploadDestinationId": {"type": "string"}, "fileName": {"type": "string"}}}
        properties["attachments"] = {"type": "array", "items": item, "minItems": op.attachments_min,
                                     "maxItems": op.attachments_max}
        if op.attachments_min:
            required.append("attachments")
    for name in op.date_fields:
        properties[name] = {"type": "string", "format": "date-time"}
    schema: dict[str, Any] = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
                              "properties": properties}
    if required:
        schema["required"] = required
    return schema


@dataclass
class Order:
    actions: list[str]
    marketplace_id: str | None = None
    locale: str = "en-US"


@dataclass
class Grant:
    """An access token LWA issued."""

    seller_id: str
    expires_at: float


@dataclass
class Fault:
    operation: str
    status: int = 500
    times: int = 1
    mode: str = "http"
    delay_s: float = 0.0

    def matches(self, operation_id: str) -> bool:
        return self.operation in ("*", operation_id)


class TokenBucket:
    """Amazon's usage-plan algorithm: `rate` tokens a second up to `burst`; each call takes one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass
class Call:
    """What the stand-in learnt about one request while serving it, for `requests()`."""

    operation: Operation
    request: Request
    order_id: str | None = None
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    seller_id: str | None = None
    marketplace_id: str | None = None


class SpapiStandIn(EmulatorServer):
    """SP-API Messaging + LWA on one port. State is guarded by the base class's lock.

    `reset()` forgets what happened (messages, requests, faults, issued access tokens, the LWA grant
    count, quota buckets), puts orders, default actions and quota back to their defaults, then re-applies
    the last `seed()`, if any (as the Vault stand-in does). Registered apps and sellers are kept: they
    are configuration a running worker still holds through the Vault stand-in; a revoked refresh token
    stays revoked until registered again (or re-seeded).
    """

    name = "spapi"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, token_ttl_s: int = 3600) -> None:
        super().__init__(host, port)
        self.token_ttl_s = token_ttl_s
        self.max_body_bytes = MAX_BODY_BYTES
        self._apps: dict[str, str] = {}
        self._sellers: dict[str, str] = {}  # refresh token -> seller id
        self._seed: dict[str, Any] = {}
        self._clear()
        self._add_control_routes()

    def _clear(self) -> None:
        self.default_actions: list[str] = list(DEFAULT_ACTIONS)
        self._orders: dict[str, Order] = {}
        self._grants: dict[str, Grant] = {}
        self._lwa_grants = 0
        self._rate, self._burst = DEFAULT_RATE, DEFAULT_BURST
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._faults: list[Fault] = []
        self._messages: list[dict[str, Any]] = []
        self._requests: list[dict[str, Any]] = []

    # --- the Python control API -----------------------------------------------------------------

    def register_app(self, client_id: str, client_secret: str) -> None:
        with self._lock:
            self._apps[client_id] = client_secret

    def register_seller(self, refresh_token: str, seller_id: str) -> None:
        """A refresh token LWA accepts, bound to a seller (as the seller's authorisation of the app is)."""
        with self._lock:
            self._sellers[refresh_token] = seller_id

    def revoke_refresh_token(self, refresh_token: str) -> None:
        """LWA answers 400 invalid_grant for it from now on; access tokens already issued live on."""
        with self._lock:
            self._sellers.pop(refresh_token, None)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far answers 403 "expired"; new grants work."""
        with self._lock:
            for grant in self._grants.values():
                grant.expires_at = 0.0

    def set_order(self, order_id: str, actions: list[str], marketplace_id: str | None = None, *,
                  locale: str = "en-US") -> None:
        """The message types `order_id` allows; with a marketplace id, other marketplaces get a 400."""
        with self._lock:
            self._orders[order_id] = Order(list(actions), marketplace_id, locale)

    def set_quota(self, rate: float, burst: int) -> None:
        """The usage plan of every (seller, operation); buckets start full again."""
        with self._lock:
            self._rate, self._burst = float(rate), int(burst)
            self._buckets.clear()

    def add_fault(self, operation: str, status: int = 500, times: int = 1, mode: str = "http",
                  delay_s: float = 0.0) -> None:
        """The next `times` calls of `operation` (an operationId, "lwa" or "*" for any) misbehave.

        "http" answers `status` with an Amazon-shaped error body (LWA-shaped for "lwa"); "delay" sleeps
        `delay_s` then serves normally; "drop_after_request" serves the request (a send IS recorded, as
        Amazon may have accepted it) and closes the connection without answering.
        """
        if mode not in FAULT_MODES:
            raise ValueError(f"fault mode must be one of {FAULT_MODES}, not {mode!r}")
        if mode == "http" and not 400 <= status <= 599:
            raise ValueError(f"an http fault answers an error status (400-599), not {status}")
        if times < 1:
            raise ValueError(f"times must be at least 1, not {times}")
        known = {op.operation_id for op in (*OPERATIONS, LWA)} | {"*"}
        if operation not in known:
            raise ValueError(f"unknown operation {operation!r}; one of {sorted(known)}")
        with self._lock:
            self._faults.append(Fault(operation, status, times, mode, delay_s))

    def pending_faults(self) -> list[dict[str, Any]]:
        """The faults not yet used up, with the calls each still applies to (`times`)."""
        with self._lock:
            return [asdict(fault) for fault in self._faults]

    def messages(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(message) for message in self._messages]

    def requests(self) -> list[dict[str, Any]]:
        """Every SP-API and LWA call; `status` is the answer served, or computed and then dropped (`fault`)."""
        with self._lock:
            return [dict(request) for request in self._requests]

    def lwa_calls(self) -> int:
        """Successful LWA token grants."""
        with self._lock:
            return self._lwa_grants

    def reset(self) -> None:
        with self._lock:
            self._clear()
            self._apply(self._seed)

    def seed(self, data: dict[str, Any]) -> None:
        """Apply {"apps": {id: secret}, "sellers": {refresh token: seller id}, "orders": {id: {"actions",
        "marketplace_id", "locale"}}, "default_actions": [...]} (all keys optional); `reset()` re-applies
        it. A later seed replaces this one for `reset()`."""
        with self._lock:
            self._seed = json.loads(json.dumps(data))  # a private copy
            self._apply(self._seed)

    def _apply(self, data: dict[str, Any]) -> None:
        with self._lock:
            for client_id, secret in data.get("apps", {}).items():
                self.register_app(client_id, secret)
            for refresh_token, seller_id in data.get("sellers", {}).items():
                self.register_seller(refresh_token, seller_id)
            for order_id, order in data.get("orders", {}).items():
                self.set_order(order_id, order.get("actions", []), order.get("marketplace_id"),
                               locale=order.get("locale", "en-US"))
            if "default_actions" in data:
                self.default_actions = list(data["default_actions"])

    # --- serving ----------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Serve one request. A "delay" fault sleeps outside the lock so other requests go on meanwhile."""
        route = self._route(request)
        if route is None:  # the control API, or a path no operation has
            return super().handle(request)
        operation, order_id = route
        call = Call(operation, request, order_id)
        with self._lock:
            fault = self._take_fault(operation.operation_id)
        if fault is not None and fault.mode == "delay":
            time.sleep(fault.delay_s)
        with self._lock:
            if fault is not None and fault.mode == "http":
                if operation is not LWA:
                    self._authenticate(call)  # only to name the seller in requests()
                response = self._fault_response(operation, fault.status)
            else:
                response = self._serve(call)
            self._finish(call, response, fault)
        return Response.dropped() if fault is not None and fault.mode == "drop_after_request" else response

    @staticmethod
    def _route(request: Request) -> tuple[Operation, str | None] | None:
        """The operation a request calls, and its order id; None for anything else."""
        if request.path == LWA_PATH and request.method == "POST":
            return LWA, None
        match = _MESSAGING_PATH_RE.match(request.path)
        if match is None:
            return None
        order_id, action = unquote(match["order"]), match["action"]
        if action is not None:
            # An action the model does not have is still served, so that it gets Amazon's refusal.
            operation = SENDS_BY_ACTION.get(action) or Operation(f"unknown:{action}", "POST", action)
        else:
            operation = GET_ATTRIBUTES if match["attributes"] else GET_ACTIONS
        return (operation, order_id) if request.method == operation.method else None

    def _take_fault(self, operation_id: str) -> Fault | None:
        for fault in self._faults:
            if fault.matches(operation_id):
                fault.times -= 1
                if fault.times <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _fault_response(operation: Operation, status: int) -> Response:
        if operation is LWA:
            error, description = LWA_ERRORS.get(status, ("server_error", HTTPStatus(status).phrase))
            return lwa_error(status, error, description)
        return amazon_error(status)

    def _serve(self, call: Call) -> Response:
        if call.operation is LWA:
            return self._token(call)
        return self._messaging(call)

    def _finish(self, call: Call, response: Response, fault: Fault | None) -> None:
        response.headers["x-amzn-RequestId"] = call.request_id
        if call.operation is not LWA and response.status in RATE_LIMITED_STATUSES:
            response.headers["x-amzn-RateLimit-Limit"] = str(self._rate)
        self._requests.append({
            "operation": call.operation.operation_id,
            "method": call.request.method,
            "path": call.request.path,
            "status": response.status,
            "request_id": call.request_id,
            "seller_id": call.seller_id,
            "order_id": call.order_id,
            "marketplace_id": call.marketplace_id,
            "user_agent": call.request.headers.get("user-agent"),
            "x_amz_date": call.request.headers.get("x-amz-date"),
            "fault": fault.mode if fault else None,
            "at": _now(),
        })

    # --- LWA ----------------------------------------------------------------------------------------

    def _token(self, call: Call) -> Response:
        try:
            form = _lwa_form(call.request)
        except ValueError as exc:
            return lwa_error(400, "invalid_request", str(exc))
        missing = "The request is missing a required parameter : {}"
        grant_type = form.get("grant_type")
        if not grant_type:
            return lwa_error(400, "invalid_request", missing.format("grant_type"))
        if grant_type != "refresh_token":  # client_credentials (grantless) is real, but not needed here
            return lwa_error(400, "unsupported_grant_type",
                             "The authorization grant type is not supported by the authorization server")
        for name in ("client_id", "client_secret", "refresh_token"):
            if not form.get(name):
                return lwa_error(400, "invalid_request", missing.format(name))
        if self._apps.get(form["client_id"]) != form["client_secret"]:
            return lwa_error(401, "invalid_client", "Client authentication failed")
        seller_id = self._sellers.get(form["refresh_token"])
        if seller_id is None:
            return lwa_error(400, "invalid_grant", LWA_INVALID_GRANT)
        call.seller_id = seller_id
        access_token = "Atza|" + secrets.token_urlsafe(270)  # real ones start so and are >= 350 characters
        self._grants[access_token] = Grant(seller_id, time.monotonic() + self.token_ttl_s)
        self._lwa_grants += 1
        body = {"access_token": access_token, "token_type": "bearer", "expires_in": self.token_ttl_s,
                "refresh_token": form["refresh_token"]}
        return Response.json(200, body, "application/json;charset=UTF-8", **LWA_HEADERS)

    # --- Messaging ----------------------------------------------------------------------------------

    def _messaging(self, call: Call) -> Response:
        """Amazon's order of checks: authentication, quota, then the request itself."""
        denied = self._authenticate(call)
        if denied is not None:
            return denied
        bucket_key = (call.seller_id or "", call.operation.operation_id)
        bucket = self._buckets.setdefault(bucket_key, TokenBucket(self._rate, self._burst))
        if not bucket.take():
            return amazon_error(429)
        invalid = self._check_order(call)
        if invalid is not None:
            return invalid
        if call.operation is GET_ACTIONS:
            return Response.json(200, self._actions_body(call), "application/hal+json")
        if call.operation is GET_ATTRIBUTES:
            return Response.json(200, {"buyer": {"locale": self._order(call).locale}}, "application/hal+json")
        return self._send(call)

    def _authenticate(self, call: Call) -> Response | None:
        token = call.request.headers.get("x-amz-access-token")
        if not token:
            return amazon_error(403, details=TOKEN_MISSING)
        grant = self._grants.get(token)
        if grant is None:
            return amazon_error(403, details=TOKEN_INVALID)
        if grant.expires_at <= time.monotonic():
            return amazon_error(403, details=TOKEN_EXPIRED)
        call.seller_id = grant.seller_id
        return None

    def _check_order(self, call: Call) -> Response | None:
        marketplaces = [m for value in call.request.query.get("marketplaceIds", []) for m in value.split(",")]
        if len(marketplaces) != 1 or not marketplaces[0]:
            return amazon_error(400, MARKETPLACE_ERROR)
        call.marketplace_id = marketplaces[0]
        if not ORDER_ID_RE.match(call.order_id or "") or call.order_id == SANDBOX_BAD_ORDER:
            return amazon_error(400, details=f"amazonOrderId {call.order_id!r} is not a 3-7-7 order id")
        order = self._order(call)
        if order.marketplace_id and order.marketplace_id != call.marketplace_id:
            return amazon_error(400, MARKETPLACE_ERROR)
        return None

    def _order(self, call: Call) -> Order:
        order = self._orders.get(call.order_id or "")
        if order is not None:
            return order
        actions = SANDBOX_ACTIONS if call.order_id == SANDBOX_ORDER else self.default_actions
        return Order(list(actions))

    def _actions_body(self, call: Call) -> dict[str, Any]:
        base = ORDER_PATH.format(order_id=call.order_id)
        query = f"?marketplaceIds={call.marketplace_id}"
        links, embedded = [], []
        for name in self._order(call).actions:
            path = f"{base}/attributes" if name == "attributes" else f"{base}/messages/{name}"
            link = {"href": path + query, "name": name}
            links.append(link)
            schema_link = {"href": f"{path}/schema", "name": name}
            action: dict[str, Any] = {"_links": {"self": link, "schema": schema_link}}
            op = SENDS_BY_ACTION.get(name)
            if op is not None:
                action["_embedded"] = {"schema": {"_links": {"self": {"href": f"{path}/schema"}},
                                                  "payload": body_schema(op)}}
            embedded.append(action)
        return {"_links": {"self": {"href": base + query}, "actions": links},
                "_embedded": {"actions": embedded}}

    def _send(self, call: Call) -> Response:
        op, request = call.operation, call.request
        if op.action in REMOVED_ACTIONS:
            return amazon_error(403, TEMPLATE_ERROR)
        if op.action not in SENDS_BY_ACTION:
            return amazon_error(404, details=f"no message type {op.action!r}")
        if len(request.body) > self.max_body_bytes:
            return amazon_error(413)
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return amazon_error(415)
        try:
            body = request.json()
        except ValueError as exc:
            return amazon_error(400, details=str(exc))
        problem = validate_body(op, body)
        if problem:
            return amazon_error(400, details=problem)
        if op.action not in self._order(call).actions:
            return amazon_error(403, TEMPLATE_ERROR)
        self._messages.append({
            "order_id": call.order_id,
            "message_type": op.action,
            "text": body.get("text"),
            "attachments": body.get("attachments"),
            "seller_id": call.seller_id,
            "marketplace_id": call.marketplace_id,
            "request_id": call.request_id,
            "at": _now(),
        })
        return Response.json(201, {}, "application/hal+json")

    # --- the HTTP control API -------------------------------------------------------------------

    def _add_control_routes(self) -> None:
        add = self.router.add
        add("POST", "/_emulator/reset", control_endpoint(lambda request: self.reset()))
        add("POST", "/_emulator/seed", control_endpoint(lambda request: self.seed(request.json())))
        add("GET", "/_emulator/messages", lambda request: Response.json(200, self.messages()))
        add("GET", "/_emulator/requests", lambda request: Response.json(200, self.requests()))
        add("GET", "/_emulator/faults", lambda request: Response.json(200, self.pending_faults()))
        add("GET", "/_emulator/lwa-calls",
            lambda request: Response.json(200, {"lwa_calls": self.lwa_calls()}))
        add("PUT", "/_emulator/orders/{order_id}", control_endpoint(self._put_order))
        add("PUT", "/_emulator/quota", control_endpoint(
            lambda request: self.set_quota(**_fields(request, "rate", "burst"))))
        add("POST", "/_emulator/faults", control_endpoint(self._post_fault))
        add("POST", "/_emulator/tokens/expire", control_endpoint(lambda request: self.expire_access_tokens()))
        add("PUT", "/_emulator/apps/{client_id}", control_endpoint(
            lambda request: self.register_app(unquote(request.params["client_id"]),
                                              _fields(request, "client_secret")["client_secret"])))
        # Refresh tokens hold "|" and maybe "/": the rest of the path, percent-decoded.
        add("PUT", "/_emulator/sellers/{refresh_token:.+}", control_endpoint(
            lambda request: self.register_seller(unquote(request.params["refresh_token"]),
                                                 _fields(request, "seller_id")["seller_id"])))
        add("DELETE", "/_emulator/sellers/{refresh_token:.+}", control_endpoint(
            lambda request: self.revoke_refresh_token(unquote(request.params["refresh_token"]))))

    def _put_order(self, request: Request) -> None:
        body = request.json()
        self.set_order(unquote(request.params["order_id"]), list(body["actions"]), body.get("marketplace_id"),
                       locale=body.get("locale", "en-US"))

    def _post_fault(self, request: Request) -> None:
        body = request.json()
        self.add_fault(body["operation"], status=int(body.get("status", 500)),
                       times=int(body.get("times", 1)), mode=body.get("mode", "http"),
                       delay_s=float(body.get("delay_s", 0.0)))


def _lwa_form(request: Request) -> dict[str, str]:
    """LWA's body: form-encoded as the docs say, or JSON as Amazon's Java SDK sends it."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("application/json"):
        body = request.json()
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        return {str(k): str(v) for k, v in body.items()}
    if content_type.startswith("application/x-www-form-urlencoded"):
        return {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
    raise ValueError(f"unsupported content type {content_type or '(none)'}")


def _fields(request: Request, *names: str) -> dict[str, Any]:
    body = request.json()
    missing = [name for name in names if name not in body]
    if missing:
        raise KeyError(f"missing fields {missing}")
    return {name: body[name] for name in names}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=Path, help="JSON file: apps, sellers, orders, default_actions "
                                                   "(or the dev stack's file, with them under \"spapi\")")
    parser.add_argument("--token-ttl", type=int, default=3600, help="access token lifetime in seconds")


def _factory(args: argparse.Namespace) -> SpapiStandIn:
    server = SpapiStandIn(args.host, args.port, token_ttl_s=args.token_ttl)
    if args.seed:
        data = json.loads(args.seed.read_text())
        server.seed(data.get("spapi", data))  # the dev stack's seed file has one section per stand-in
    return server


if __name__ == "__main__":
    run_cli("Amazon SP-API Messaging + LWA stand-in", _factory, _configure)
