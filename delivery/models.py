"""The data contracts (ARCHITECTURE §3): pydantic models, no behaviour beyond validation.

`ReplyRequest` and `DeliveryTrace` are a public contract: other languages start deliveries with plain
JSON, so their JSON Schema is exported to docs/schema/ (`python starter.py schema`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, StringConstraints, model_validator

# ASCII digits only: \d would also take other scripts' digits (e.g. Arabic-Indic).
ORDER_ID_PATTERN = r"[0-9]{3}-[0-9]{7}-[0-9]{7}"
ORDER_ID_RE = re.compile(rf"^{ORDER_ID_PATTERN}$")
TENANT_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# Also the local part of the SMTP Message-ID: a dot-atom, so no "..", no leading or trailing dot.
DELIVERY_ID_PATTERN = r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$"

# Largest reply body we accept. Bodies travel in workflow payloads (server warns at 256 KB, refuses
# at 2 MB) and relay mail is meant to be short; 100,000 characters is far above any real reply.
MAX_BODY_CHARS = 100_000
MAX_SUBJECT_CHARS = 998  # RFC 5322 line limit
MAX_REF_CHARS = 256

Channel = Literal["amazon", "email", "ebay", "cdiscount", "shopify"]
ProviderInitial = Literal["spapi", "smtp"]
ProviderFinal = Literal["SPAPI", "SMTP_FALLBACK", "SMTP"]
DeliveryStatus = Literal["pending", "delivering", "awaiting_action", "delivered", "failed", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"delivered", "failed", "cancelled"})

# Message types of the Messaging API, named as `getMessagingActionsForOrder` names them (the path
# segment after /messages/), for the types that carry a text reply.
SpapiMessageType = Literal[
    "confirmCustomizationDetails",
    "confirmDeliveryDetails",
    "confirmOrderDetails",
    "confirmServiceDetails",
    "digitalAccessKey",
    "unexpectedProblem",
]

NO_REPLY_LOCAL_PARTS = frozenset({"no-reply", "noreply", "donotreply", "do-not-reply"})


def _no_control_chars(value: str) -> str:
    """Header values with CR, LF or NUL are refused, never stripped: they are header injection."""
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("must not contain CR, LF or NUL characters")
    return value


def _not_no_reply(value: str) -> str:
    local = value.rsplit("@", 1)[0].lower()
    if local in NO_REPLY_LOCAL_PARTS:
        raise ValueError(f"{value!r} is a no-reply address; a reply sent there is discarded")
    return value


HeaderText = Annotated[str, AfterValidator(_no_control_chars)]
Address = Annotated[EmailStr, AfterValidator(_no_control_chars)]
OrderId = Annotated[str, StringConstraints(pattern=rf"^{ORDER_ID_PATTERN}$")]
TenantId = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]
DeliveryId = Annotated[str, StringConstraints(pattern=DELIVERY_ID_PATTERN, max_length=128)]
Ref = Annotated[str, StringConstraints(max_length=MAX_REF_CHARS), AfterValidator(_no_control_chars)]


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ReplyRequest(Contract):
    """One agent reply to deliver. The workflow id is `delivery_id`."""

    delivery_id: DeliveryId = Field(description="Unique id of this delivery; also the workflow id.")
    tenant_id: TenantId = Field(description="Help-desk tenant (a slug: it is part of a Vault path).")
    conversation_id: Ref = Field(description="Help-desk conversation the reply belongs to.")
    channel: Channel = Field(description="Where the conversation came from; `amazon` tries SP-API first.")
    order_ref: Ref | None = Field(default=None, description="Order reference as the help-desk knows it.")
    thread_key: Ref | None = Field(default=None, description="Thread key of the conversation (may hold the order id).")
    marketplace_id: Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{5,20}$")] | None = Field(
        default=None, description="Amazon marketplace id (e.g. A13V1IB3VIYZZH); else the tenant's from Vault."
    )
    to: Annotated[Address, AfterValidator(_not_no_reply)] = Field(
        description="Recipient: the buyer's address or Amazon relay address."
    )
    from_address: Address | None = Field(default=None, description="Sender; else the configured sender.")
    subject: Annotated[HeaderText, StringConstraints(min_length=1, max_length=MAX_SUBJECT_CHARS)]
    body_text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_BODY_CHARS)] = Field(
        description=f"Plain-text reply, at most {MAX_BODY_CHARS} characters."
    )
    body_html: Annotated[str, StringConstraints(max_length=MAX_BODY_CHARS)] | None = Field(
        default=None, description="Optional HTML alternative (SMTP only; SP-API refuses HTML)."
    )
    in_reply_to: Annotated[HeaderText, StringConstraints(pattern=r"^<[^<>\s]+@[^<>\s]+>$")] | None = Field(
        default=None, description="Message-ID of the buyer's mail, `<id@host>`, for threading."
    )
    spapi_message_type: SpapiMessageType | None = Field(
        default=None, description="Pin the SP-API message type (used only if the order allows it)."
    )
    awaiting_action_hours: Annotated[float, Field(gt=0, le=24 * 30)] | None = Field(
        default=None, description="How long an ambiguous or stuck delivery waits for an operator (default 72)."
    )

    @model_validator(mode="after")
    def _body_has_no_nul(self) -> ReplyRequest:
        if "\0" in self.body_text:
            raise ValueError("body_text must not contain NUL characters")
        return self


class TraceEvent(Contract):
    at: datetime
    step: str = Field(description="delivery, resolve_order_id, fetch_credentials, spapi_send, smtp_send, "
                                  "operator, persist_trace")
    outcome: str
    attempt: int | None = None
    detail: str | None = None


class DeliveryTrace(Contract):
    """What happened to one delivery: the `trace` query, `trace --json` and the delivery_trace row."""

    delivery_id: str
    tenant_id: str
    conversation_id: str
    channel: str
    provider_initial: ProviderInitial
    provider_final: ProviderFinal | None = None
    status: DeliveryStatus = "pending"
    note: str | None = None
    order_id: str | None = None
    spapi_message_type: str | None = None
    spapi_request_id: str | None = None
    email_message_id: str | None = None
    events: list[TraceEvent] = Field(default_factory=list)

    @classmethod
    def begin(cls, request: ReplyRequest, at: datetime) -> DeliveryTrace:
        trace = cls(
            delivery_id=request.delivery_id,
            tenant_id=request.tenant_id,
            conversation_id=request.conversation_id,
            channel=request.channel,
            provider_initial="spapi" if request.channel == "amazon" else "smtp",
        )
        trace.events.append(TraceEvent(at=at, step="delivery", outcome="received", detail=f"channel {request.channel}"))
        return trace

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


# --- activity inputs and results -----------------------------------------------------------------


class OrderLookup(Contract):
    order_ref: str | None = None
    thread_key: str | None = None
    subject: str | None = None


class CredentialsRequest(Contract):
    tenant_id: TenantId
    marketplace_id: str | None = None


class CredentialsRef(Contract):
    """Where the tenant's SP-API secrets are, never the secrets themselves."""

    tenant_id: str
    seller_id: str
    marketplace_id: str
    region: Literal["na", "eu", "fe"]
    app_version: int = Field(description="Vault KV version of the app secret read.")
    tenant_version: int = Field(description="Vault KV version of the tenant secret read.")
    served_from_cache_during_outage: bool = False


class SpapiSendInput(Contract):
    delivery_id: str
    credentials: CredentialsRef
    order_id: OrderId
    marketplace_id: str
    text: str
    message_type: SpapiMessageType | None = Field(default=None, description="Pinned type, if any.")
    attempt: int = 1


class SpapiSendResult(Contract):
    message_type: str
    request_id: str | None = None


class SmtpSendInput(Contract):
    delivery_id: str
    tenant_id: str
    to: str
    from_address: str | None = None
    subject: str
    body_text: str
    body_html: str | None = None
    in_reply_to: str | None = None
    fallback: bool = False
    attempt: int = 1


class SmtpSendResult(Contract):
    message_id: str
    server_reply: str


class PersistTraceInput(Contract):
    trace: DeliveryTrace
    sequence: int = Field(description="Grows with every write of a delivery (workflow time in microseconds x 1000 "
                                      "+ write number): a lower sequence never overwrites a higher.")


# --- operator actions (Updates with validators, same names as Signals) ---------------------------

OperatorActionName = Literal["retry", "force_smtp", "set_order_id", "mark_delivered"]
OPERATOR_ACTIONS: tuple[str, ...] = ("retry", "force_smtp", "set_order_id", "mark_delivered")


class OperatorActionInput(Contract):
    """Arguments of an operator action; the action itself is the update (or signal) name."""

    order_id: OrderId | None = Field(default=None, description="For set_order_id: 3-7-7 digits.")
    note: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        default=None, description="For mark_delivered: how the reply reached the buyer.")
    by: Annotated[str, StringConstraints(max_length=200)] | None = Field(default=None, description="Who acts.")
    reason: Annotated[str, StringConstraints(max_length=2000)] | None = Field(default=None, description="Why.")


class OperatorActionResult(Contract):
    accepted: bool
    status: DeliveryStatus
    message: str
