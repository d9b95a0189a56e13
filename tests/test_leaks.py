"""With keys set, nothing personal or secret leaks: every decision branch of the workflow is run once,
then each reply's body and buyer address, and every secret, are searched for in

- the raw stored history, fetched by a client WITHOUT the codec (body and address may be there only
  encrypted; secrets not even encrypted);
- the worker's logs, every logger at DEBUG except the stand-ins' own (never);
- the delivery_trace rows (never).

Every branch has its own body and address, so a finding names the branch. A control delivery made
without keys shows the same search does find plaintext.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from delivery import search_attributes as sa
from delivery.codec import ENCODING, EncryptionCodec
from delivery.converter import data_converter
from delivery.history import trace_from_history
from delivery.models import DeliveryTrace, OperatorActionInput, ReplyRequest
from delivery.settings import (
    CodecSettings,
    Settings,
)
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from devstack.vault import VaultStandIn
from starter import new_delivery_id, start_delivery
from tests.conftest import (
    APP_SECRET,
    ORDER_ID,
    REFRESH_TOKEN,
    SECRET_VALUES,
    SELLER_ID,
    TENANT,
    TENANT_SECRET,
    _binary,
    settings_for,
)
from worker import delivery_worker

KEY = base64.b64encode(os.urandom(32)).decode()
CODEC_TOKEN = "codec-server-token-Z9q"
CODEC = CodecSettings(keys={"leak-test": KEY}, server_token=CODEC_TOKEN)
SECRETS = (*SECRET_VALUES, "Atza|", KEY, CODEC_TOKEN)
SECRET_BYTES = (base64.b64decode(KEY),)
# The outside world's own logs (the stand-ins and the SMTP sink) are not the worker's.
NOT_THE_WORKER = ("devstack", "mail.log", "aiosmtpd")



@dataclass
class Branch:
    name: str
    fields: dict[str, Any]
    outcome: tuple[str, str | None]
    arrange: Callable[[SpapiStandIn, SmtpSink, VaultStandIn, str], None] = lambda *_: None
    wait_for: Callable[[DeliveryTrace], bool] | None = None
    act: Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]] | None = None
    skipping: bool = False  # hours of backoff or waiting: run on the time-skipping server

    @property
    def body(self) -> str:
        return f"Reply for branch {self.name}: thank you, your parcel is on its way."

    @property
    def address(self) -> str:
        if self.fields.get("channel") == "email":
            return f"buyer.{self.name.replace('_', '.')}@example.org"
        return f"relay{self.name.replace('_', '')}x7kq@marketplace.amazon.fr"


def parked(trace: DeliveryTrace) -> bool:
    return trace.status == "awaiting_action"


def smtp_backoff(trace: DeliveryTrace) -> bool:
    return any(e.step == "smtp_send" and e.outcome == "failed" for e in trace.events)


def update(name: str, **args: Any) -> Callable[[WorkflowHandle[Any, Any]], Awaitable[Any]]:
    async def run(handle: WorkflowHandle[Any, Any]) -> Any:
        return await handle.execute_update(name, OperatorActionInput(by="ops-alice", reason="leak test", **args))
    return run


async def cancel(handle: WorkflowHandle[Any, Any]) -> None:
    await handle.cancel(reason="duplicate ticket")


def refuse_rcpt(code: int, quote: bool = False, times: int = 1, spapi_400: bool = False) -> Callable[..., None]:
    def arrange(spapi: SpapiStandIn, smtp: SmtpSink, vault: VaultStandIn, address: str) -> None:
        if spapi_400:
            spapi.add_fault("createConfirmOrderDetails", status=400)
        message = f"5.1.1 <{address}>: Recipient address rejected" if quote else None
        smtp.add_fault(code, times=times, stage="rcpt", match_rcpt=address, message=message)
    return arrange


BRANCHES = [
    Branch("spapi_delivered", {"order_ref": ORDER_ID}, ("delivered", "SPAPI")),
    Branch("no_order_id", {"subject": "A question about sizes"}, ("delivered", "SMTP_FALLBACK")),
    Branch("spapi_rejected", {"order_ref": ORDER_ID}, ("delivered", "SMTP_FALLBACK"),
           arrange=lambda spapi, *_: spapi.add_fault("createConfirmOrderDetails", status=400)),
    Branch("no_allowed_message_type", {"order_ref": ORDER_ID}, ("delivered", "SMTP_FALLBACK"),
           arrange=lambda spapi, *_: spapi.set_order(ORDER_ID, actions=[])),
    Branch("tenant_without_credentials", {"tenant_id": "bistro", "order_ref": ORDER_ID},
           ("delivered", "SMTP_FALLBACK")),
    Branch("html_body_not_eligible", {"order_ref": ORDER_ID}, ("delivered", "SMTP_FALLBACK")),
    Branch("email_channel", {"channel": "email"}, ("delivered", "SMTP")),
    Branch("spapi_and_smtp_refuse", {"order_ref": ORDER_ID}, ("failed", None),
           arrange=refuse_rcpt(550, spapi_400=True)),
    Branch("smtp_550_quoting_the_address", {"channel": "email"}, ("failed", None),
           arrange=refuse_rcpt(550, quote=True)),
    Branch("ambiguous_then_mark_delivered", {"order_ref": ORDER_ID}, ("delivered", "SPAPI"),
           arrange=lambda spapi, *_: spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request"),
           wait_for=parked, act=update("mark_delivered", note="seen in Seller Central")),
    Branch("ambiguous_then_force_smtp", {"order_ref": ORDER_ID}, ("delivered", "SMTP_FALLBACK"),
           arrange=lambda spapi, *_: spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request"),
           wait_for=parked, act=update("force_smtp")),
    Branch("smtp_backoff_then_retry", {"channel": "email"}, ("delivered", "SMTP"), arrange=refuse_rcpt(451),
           wait_for=smtp_backoff, act=update("retry")),
    Branch("set_order_id_during_smtp_backoff", {"subject": "Where is my parcel?"}, ("delivered", "SPAPI"),
           arrange=refuse_rcpt(451, times=100), wait_for=smtp_backoff, act=update("set_order_id", order_id=ORDER_ID)),
    Branch("cancelled_during_smtp_backoff", {"channel": "email"}, ("cancelled", None),
           arrange=refuse_rcpt(451, times=1000), wait_for=smtp_backoff, act=cancel),
    Branch("vault_down_parks_then_times_out", {"order_ref": ORDER_ID, "awaiting_action_hours": 1}, ("failed", None),
           arrange=lambda spapi, smtp, vault, _: vault.add_fault(503, times=1000), skipping=True),
    Branch("spapi_500_until_attempts_run_out", {"order_ref": ORDER_ID}, ("delivered", "SMTP_FALLBACK"),
           arrange=lambda spapi, *_: spapi.add_fault("createConfirmOrderDetails", status=500, times=100),
           skipping=True),
    Branch("ambiguous_nobody_acts_for_72_hours", {"order_ref": ORDER_ID}, ("failed", None),
           arrange=lambda spapi, *_: spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request"),
           skipping=True),
]
BY_NAME = {branch.name: branch for branch in BRANCHES}


@dataclass
class Ran:
    branch: Branch
    delivery_id: str
    trace: DeliveryTrace
    raw_history: bytes = b""  # every event, serialized as stored (no codec)
    decrypted: bytes = b""  # every payload's data after decryption
    encrypted_inputs: bool = False
    trace_row: str = ""


@dataclass
class Evidence:
    runs: dict[str, Ran] = field(default_factory=dict)
    logs: list[logging.LogRecord] = field(default_factory=list)
    control: Ran | None = None

    def log_text(self) -> str:
        return "\n".join(_record_text(record) for record in self.logs if not record.name.startswith(NOT_THE_WORKER))


_STANDARD = set(vars(logging.LogRecord("n", 0, "p", 0, "m", None, None))) | {"message", "asctime"}
_FORMAT = logging.Formatter("%(name)s %(levelname)s %(message)s")


def _record_text(record: logging.LogRecord) -> str:
    extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
    return f"{_FORMAT.format(record)} {extras!r} {record.args!r}"


class _Capture(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture(scope="module")
def worker_logs() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []
    root = logging.getLogger()
    handler, level = _Capture(records), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def fresh_world(spapi: SpapiStandIn, vault: VaultStandIn, smtp: SmtpSink) -> None:
    """What conftest's spapi, vault and smtp fixtures set up, again before each branch."""
    spapi.reset()
    spapi.register_app(APP_SECRET["client_id"], APP_SECRET["client_secret"])
    spapi.register_seller(REFRESH_TOKEN, SELLER_ID)
    vault.reset()
    vault.put_secret("keybuzz/amazon_spapi/app", APP_SECRET)
    vault.put_secret(f"keybuzz/tenants/{TENANT}/amazon_spapi", TENANT_SECRET)
    smtp.reset()


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every Payload anywhere inside a proto message (inputs, results, failures, summaries, markers...)."""
    if isinstance(message, Payload):
        yield message
        return
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            values = value.values() if descriptor.message_type.fields_by_name["value"].message_type else []
        elif descriptor.is_repeated:
            values = value
        else:
            values = [value]
        for item in values:
            yield from payloads_in(item)


async def run_branch(client: Client, settings: Settings, branch: Branch, spapi: SpapiStandIn, vault: VaultStandIn,
                     smtp: SmtpSink) -> Ran:
    fresh_world(spapi, vault, smtp)
    branch.arrange(spapi, smtp, vault, branch.address)
    body = f"<p>{branch.body}</p>" if branch.name == "html_body_not_eligible" else branch.body
    fields: dict[str, Any] = {
        "delivery_id": new_delivery_id(), "tenant_id": TENANT, "conversation_id": f"conv-{branch.name}",
        "channel": "amazon", "subject": "Re: your order", **branch.fields, "to": branch.address, "body_text": body}
    handle = await start_delivery(client, ReplyRequest(**fields), task_queue=settings.temporal.task_queue)
    if branch.wait_for is not None and branch.act is not None:
        for _ in range(200):
            if branch.wait_for(await handle.query("trace", result_type=DeliveryTrace)):
                break
            await asyncio.sleep(0.05)
        await branch.act(handle)
    try:
        await handle.result()
    except Exception:
        pass  # cancelled: the trace is read from history below either way
    trace = await handle.query("trace", result_type=DeliveryTrace) if branch.outcome[0] != "cancelled" else None
    if trace is None:
        trace = await trace_from_history(await handle.fetch_history(), client.data_converter)
    return Ran(branch, fields["delivery_id"], trace)


async def collect(ran: Ran, raw_client: Client, codec: EncryptionCodec | None, database: Path) -> None:
    history = await raw_client.get_workflow_handle(ran.delivery_id).fetch_history()
    ran.raw_history = b"".join(event.SerializeToString() for event in history.events)
    decrypted = []
    for event in history.events:
        for payload in payloads_in(event):
            if payload.metadata.get("encoding") == ENCODING and codec is not None:
                payload = codec.decrypt([payload])[0]
            decrypted.append(payload.data)
    ran.decrypted = b"\n".join(decrypted)
    started = history.events[0].workflow_execution_started_event_attributes
    ran.encrypted_inputs = all(p.metadata.get("encoding") == ENCODING for p in started.input.payloads)
    with sqlite3.connect(database) as db:
        ran.trace_row = repr(db.execute("SELECT * FROM delivery_trace WHERE delivery_id = ?",
                                        (ran.delivery_id,)).fetchall())


def leak_settings(spapi: SpapiStandIn, vault: VaultStandIn, smtp: SmtpSink, database: Path, codec: CodecSettings
                  ) -> Settings:
    return settings_for(spapi, vault, smtp, database, codec=codec)


@pytest_asyncio.fixture(scope="module")
async def evidence(worker_logs: list[logging.LogRecord], spapi_server: SpapiStandIn, vault_server: VaultStandIn,
                   smtp_server: SmtpSink, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Evidence]:
    database = tmp_path_factory.mktemp("leaks") / "trace.db"
    settings = leak_settings(spapi_server, vault_server, smtp_server, database, CODEC)
    world = (spapi_server, vault_server, smtp_server)
    found = Evidence(logs=worker_logs)
    codec = EncryptionCodec.from_settings(CODEC)

    live = await WorkflowEnvironment.start_local(dev_server_existing_path=_binary("temporal"),
                                                 data_converter=data_converter(CODEC),
                                                 search_attributes=list(sa.ALL), dev_server_log_level="error")
    async with live:
        raw_client = await Client.connect(live.client.service_client.config.target_host,
                                           data_converter=data_converter())  # no codec
        async with delivery_worker(live.client, settings):
            for branch in BRANCHES:
                if not branch.skipping:
                    found.runs[branch.name] = await run_branch(live.client, settings, branch, *world)
        for ran in found.runs.values():
            await collect(ran, raw_client, codec, database)

        # The control: the same search over a delivery made without keys finds the plaintext.
        plain_settings = leak_settings(*world, database, CodecSettings())
        async with delivery_worker(raw_client, plain_settings):
            found.control = await run_branch(raw_client, plain_settings, BY_NAME["email_channel"], *world)
        await collect(found.control, raw_client, None, database)

    skipping = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"), data_converter=data_converter(CODEC))
    async with skipping:
        raw_client = await Client.connect(skipping.client.service_client.config.target_host,
                                           data_converter=data_converter())  # no codec
        async with delivery_worker(skipping.client, settings):
            for branch in BRANCHES:
                if branch.skipping:
                    found.runs[branch.name] = await run_branch(skipping.client, settings, branch, *world)
                    await collect(found.runs[branch.name], raw_client, codec, database)
    fresh_world(*world)
    yield found


def branch_params() -> list[Any]:
    return [pytest.param(b.name, id=b.name) for b in BRANCHES]


def test_every_branch_ran_to_its_outcome_with_keys_set(evidence: Evidence) -> None:
    outcomes = {name: (ran.trace.status, ran.trace.provider_final) for name, ran in evidence.runs.items()}
    assert outcomes == {branch.name: branch.outcome for branch in BRANCHES}
    html = evidence.runs["html_body_not_eligible"].trace
    assert html.note and "HTML" in html.note


def test_the_search_finds_plaintext_in_a_delivery_made_without_keys(evidence: Evidence) -> None:
    control = evidence.control
    assert control is not None and control.trace.status == "delivered"
    assert not control.encrypted_inputs
    assert control.branch.body.encode() in control.raw_history
    assert control.branch.address.encode() in control.raw_history


@pytest.mark.parametrize("name", branch_params())
def test_raw_history_holds_body_and_address_only_encrypted(evidence: Evidence, name: str) -> None:
    ran = evidence.runs[name]
    assert ran.encrypted_inputs, "the workflow input is stored unencrypted"
    for text in (ran.branch.body, ran.branch.address):
        assert text.encode() not in ran.raw_history, f"{text!r} is readable in the stored history"
        assert text.encode() in ran.decrypted, f"{text!r} should be in the history, encrypted"


@pytest.mark.parametrize("name", branch_params())
def test_no_secret_is_in_the_history_even_encrypted(evidence: Evidence, name: str) -> None:
    ran = evidence.runs[name]
    for secret in (*(s.encode() for s in SECRETS), *SECRET_BYTES):
        assert secret not in ran.raw_history and secret not in ran.decrypted, f"secret {secret[:6]!r}... in history"


@pytest.mark.parametrize("name", branch_params())
def test_trace_row_holds_no_body_no_address_no_secret(evidence: Evidence, name: str) -> None:
    ran = evidence.runs[name]
    assert ran.delivery_id in ran.trace_row, "the delivery_trace row was not written"
    for text in (ran.branch.body, ran.branch.address, *SECRETS):
        assert text not in ran.trace_row, f"{text[:24]!r} is in the delivery_trace row"


def test_worker_logs_hold_no_body_and_no_secret(evidence: Evidence) -> None:
    logs = evidence.log_text()
    seen = {(r.name.split(".")[0], r.levelname) for r in evidence.logs}
    assert {("temporalio", "DEBUG"), ("temporalio", "WARNING"), ("httpx", "INFO")} <= seen, "the capture missed"
    for branch in BRANCHES:
        assert branch.body not in logs, f"the body of {branch.name} is in the worker's logs"
    for secret in SECRETS:
        assert secret not in logs, f"secret {secret[:6]!r}... is in the worker's logs"


@pytest.mark.parametrize("name", branch_params())
def test_worker_logs_hold_no_buyer_address(evidence: Evidence, name: str) -> None:
    address = BY_NAME[name].address
    leaking = [_record_text(r)[:300] for r in evidence.logs
               if not r.name.startswith(NOT_THE_WORKER) and address in _record_text(r)]
    assert not leaking, f"the buyer address of {name} is in the worker's logs: {leaking[:2]}"


def test_summaries_are_encrypted_too_and_search_attributes_stay_readable(evidence: Evidence) -> None:
    ran = evidence.runs["spapi_delivered"]
    for summary in (b"Reply of tenant acme", b"SP-API message for order", b"delivery_trace row:"):
        assert summary not in ran.raw_history and summary in ran.decrypted
    # Search attributes are indexed by the server, so plain by design: ids and states, no personal data.
    assert ORDER_ID.encode() in ran.raw_history and b"DeliveryStatus" in ran.raw_history
