"""The delivery_trace table: a true projection of the history, on SQLite and on PostgreSQL.

PostgreSQL tests use their own database (`test_trace_<random>`, created on the server's `test`
database and dropped at the end), so parallel runs on one server do not collide. They skip, saying
why, only where nothing answers on 127.0.0.1:5432.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import inspect
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.trace_store import TraceActivities, TraceStore
from delivery.history import trace_from_history
from delivery.models import DeliveryTrace, OperatorActionInput, OperatorActionResult, PersistTraceInput, TraceEvent
from delivery.settings import Settings, TraceSettings
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from tests.conftest import ORDER_ID, RELAY_ADDRESS, Deliveries, stored_trace, worker_with

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/test"


# --- PostgreSQL: a database of our own, or a skip that says why ---------------------------------------


def postgres_absent_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when something answers on 127.0.0.1:5432."""
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            return None
    except OSError as err:
        return (f"no PostgreSQL server answers on {PG_HOST}:{PG_PORT} ({type(err).__name__}: {err}); the "
                "delivery_trace tests on PostgreSQL need one (user postgres, trust auth, database `test`)")


@asynccontextmanager
async def postgres_database(prefix: str = "test_trace") -> AsyncIterator[str]:
    """A fresh database on the local server for this run; yields its SQLAlchemy URL, drops it after."""
    reason = postgres_absent_reason()
    if reason:
        pytest.skip(reason)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    # The server answers: from here on a failure is a failure, not a skip.
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture(scope="module")
async def postgres_url() -> AsyncIterator[str]:
    async with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'trace.db'}"


@pytest_asyncio.fixture
async def store(store_url: str) -> AsyncIterator[TraceStore]:
    trace_store = TraceStore.from_url(store_url)
    await trace_store.migrate()
    try:
        yield trace_store
    finally:
        await trace_store.close()


def a_trace(status: str = "delivering", **fields: Any) -> DeliveryTrace:
    """A trace as the workflow writes it at `status`: every event up to there."""
    start = datetime(2026, 12, 4, 9, 30, 0, 123456, tzinfo=UTC)
    steps = [("delivery", "received", None, "channel amazon"), ("delivery", "delivering", None, None),
             ("resolve_order_id", "found", None, ORDER_ID), ("spapi_send", "permanent", 1, "403 Invalid template"),
             ("delivery", "fallback", None, "SP-API refused - SMTP fallback used"),
             ("smtp_send", "ok", 1, "<x@acme-shop.example>: 250 OK"), ("delivery", "delivered", None, "SMTP_FALLBACK")]
    upto = {"delivering": 2, "awaiting_action": 4, "delivered": len(steps)}.get(status, len(steps))
    values: dict[str, Any] = {
        "delivery_id": f"dlv-store-{uuid.uuid4().hex[:10]}", "tenant_id": "acme", "conversation_id": "conv-1",
        "channel": "amazon", "provider_initial": "spapi", "status": status, "order_id": ORDER_ID,
        "events": [TraceEvent(at=start + timedelta(seconds=i), step=step, outcome=outcome, attempt=attempt,
                              detail=detail)
                   for i, (step, outcome, attempt, detail) in enumerate(steps[:upto])],
    }
    if status == "delivered":
        values.update(provider_final="SMTP_FALLBACK", note="SP-API refused - SMTP fallback used",
                      email_message_id="<x@acme-shop.example>", spapi_message_type="confirmOrderDetails",
                      spapi_request_id="req-1")
    values.update(fields)
    return DeliveryTrace(**values)


# --- the table ------------------------------------------------------------------------------------


async def test_migration_is_idempotent_also_when_workers_start_together(store_url: str) -> None:
    stores = [TraceStore.from_url(store_url) for _ in range(4)]
    try:
        # Four workers starting at the same moment, then each restarting: no error, one table.
        await asyncio.gather(*(s.migrate() for s in stores))
        for s in stores:
            await s.migrate()
        trace = a_trace()
        assert await stores[0].upsert(trace, 1)
        await stores[1].migrate()  # a later worker start keeps the rows
        assert await stores[2].get(trace.delivery_id) == (trace, 1)

        async with stores[0].engine.connect() as conn:
            columns, indexes = await conn.run_sync(
                lambda sync: ({c["name"] for c in inspect(sync).get_columns("delivery_trace")},
                              {tuple(i["column_names"]) for i in inspect(sync).get_indexes("delivery_trace")}))
    finally:
        for s in stores:
            await s.close()
    summary = set(DeliveryTrace.model_fields) - {"events"}
    assert columns == summary | {"events", "sequence", "updated_at"}
    assert {("tenant_id",), ("status",)} <= indexes


async def test_row_holds_every_field_and_event_of_the_trace(store: TraceStore) -> None:
    trace = a_trace("delivered", note="Marked delivered by carol: seen in Seller Central")

    assert await store.get(trace.delivery_id) is None
    assert await store.upsert(trace, 1)

    assert await store.get(trace.delivery_id) == (trace, 1)


async def test_a_late_retry_of_an_older_write_never_overwrites_the_newer_row(store: TraceStore) -> None:
    delivering, delivered = a_trace("delivering"), a_trace("delivered")
    delivered = delivered.model_copy(update={"delivery_id": delivering.delivery_id})

    # persist_trace #3 (final) got through first; the retry of #2 (delivering) arrives late.
    assert await store.upsert(delivered, 3) is True
    assert await store.upsert(delivering, 2) is False
    assert await store.get(delivered.delivery_id) == (delivered, 3)

    # A retry of the very write already stored changes nothing; a newer one is written.
    assert await store.upsert(delivering, 3) is False
    assert await store.get(delivered.delivery_id) == (delivered, 3)
    newer = delivered.model_copy(update={"note": "newer"})
    assert await store.upsert(newer, 4) is True
    assert await store.get(delivered.delivery_id) == (newer, 4)


async def test_persist_trace_activity_retried_out_of_order_keeps_the_newest(store: TraceStore) -> None:
    activities = TraceActivities(store)
    env = ActivityEnvironment()
    awaiting = a_trace("awaiting_action")
    final = a_trace("delivered", delivery_id=awaiting.delivery_id)

    assert await env.run(activities.persist_trace, PersistTraceInput(trace=final, sequence=3)) is True
    assert await env.run(activities.persist_trace, PersistTraceInput(trace=awaiting, sequence=2)) is False

    assert await store.get(final.delivery_id) == (final, 3)


async def test_trace_store_down_is_a_transient_error_never_a_failed_delivery(tmp_path: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "a-directory").mkdir()
    for url in (f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test",  # connection refused
                f"sqlite+aiosqlite:///{tmp_path / 'a-directory'}"):  # unable to open database file
        down = TraceStore.from_url(url)
        try:
            with pytest.raises(ApplicationError) as raised:
                await ActivityEnvironment().run(TraceActivities(down).persist_trace,
                                                PersistTraceInput(trace=a_trace(), sequence=1))
        finally:
            await down.close()
        assert raised.value.type == "transient", url
        assert not raised.value.non_retryable, url
        assert raised.value.message.startswith("trace store unavailable: "), raised.value.message
        assert "\n" not in raised.value.message


@pytest.mark.postgres
async def test_nul_in_a_note_does_not_block_the_row_on_postgresql(postgres_url: str) -> None:
    # An operator's mark_delivered note is free text: PostgreSQL text cannot hold NUL, and a write that
    # fails at every retry would keep the delivery open forever.
    store = TraceStore.from_url(postgres_url)
    try:
        await store.migrate()
        trace = a_trace("delivered", note="Marked delivered by carol: pasted\x00text")
        assert await store.upsert(trace, 1)
        row = await store.get(trace.delivery_id)
    finally:
        await store.close()
    assert row is not None
    assert row[0].note == "Marked delivered by carol: pasted\ufffdtext"
    assert row[0].model_copy(update={"note": trace.note}) == trace


@pytest.mark.postgres
async def test_a_url_without_driver_uses_the_async_driver(postgres_url: str, tmp_path: Any) -> None:
    for url in (postgres_url.replace("postgresql+asyncpg://", "postgresql://"), f"sqlite:///{tmp_path / 't.db'}"):
        store = TraceStore.from_url(url)
        try:
            await store.migrate()
            trace = a_trace()
            assert await store.upsert(trace, 1)
            assert await store.get(trace.delivery_id) == (trace, 1)
        finally:
            await store.close()


# --- each branch of the decision flow: history == query == row, on both stores -------------------------


@pytest_asyncio.fixture
async def store_deliveries(temporal_env: WorkflowEnvironment, settings: Settings, store_url: str,
                           request: pytest.FixtureRequest) -> AsyncIterator[Deliveries]:
    """A worker whose trace store is SQLite or PostgreSQL (the parameter of `store_url`)."""
    on_store = settings.model_copy(update={"trace": TraceSettings(database_url=store_url)})
    async with worker_with(temporal_env, on_store, request.node.name) as deliveries:
        yield deliveries


async def assert_history_query_and_row_agree(client: Client, settings: Settings, delivery_id: str,
                                             result: DeliveryTrace | None = None) -> DeliveryTrace:
    """The trace rebuilt from history, the `trace` query, the delivery_trace row (and the result) are one.

    The row also carries the sequence of the last persist_trace the workflow started: the final write won.
    """
    handle = client.get_workflow_handle(delivery_id)
    history = await handle.fetch_history()
    rebuilt = await trace_from_history(history, client.data_converter)
    queried = await handle.query("trace", result_type=DeliveryTrace)
    store = TraceStore.from_url(settings.trace.database_url)
    try:
        stored = await store.get(delivery_id)
    finally:
        await store.close()
    assert stored is not None, f"no delivery_trace row for {delivery_id}"
    row, sequence = stored

    as_json = {"history": rebuilt.model_dump(mode="json"), "query": queried.model_dump(mode="json"),
               "row": row.model_dump(mode="json")}
    if result is not None:
        as_json["result"] = result.model_dump(mode="json")
    assert as_json["row"] == as_json["history"], "delivery_trace row differs from the trace rebuilt from history"
    assert as_json["query"] == as_json["history"], "the trace query differs from the trace rebuilt from history"
    if result is not None:
        assert as_json["result"] == as_json["history"], "the workflow result differs from the rebuilt trace"
    persists = [e for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and e.activity_task_scheduled_event_attributes.activity_type.name == "persist_trace"]
    sequences = []
    for event in persists:
        [written] = await client.data_converter.decode(event.activity_task_scheduled_event_attributes.input.payloads,
                                                       [PersistTraceInput])
        sequences.append(written.sequence)
    assert sequences == sorted(set(sequences)), "persist_trace sequences must grow with every write"
    assert sequence == sequences[-1], "the row was not written by the last persist_trace"
    return rebuilt


async def wait_until(condition: Any, what: str, within_s: float = 20.0) -> Any:
    """Poll `condition()` (a coroutine function) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        value = await condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what}: not within {within_s}s (last: {value!r})")
        await asyncio.sleep(0.1)


async def _query(handle: WorkflowHandle[Any, Any]) -> DeliveryTrace:
    trace: DeliveryTrace = await handle.query("trace", result_type=DeliveryTrace)
    return trace


async def test_spapi_delivered(store_deliveries: Deliveries, spapi: SpapiStandIn) -> None:
    result = await (await store_deliveries.start(store_deliveries.request(order_ref=ORDER_ID))).result()
    assert (result.status, result.provider_final) == ("delivered", "SPAPI")
    await assert_history_query_and_row_agree(store_deliveries.client, store_deliveries.settings,
                                             result.delivery_id, result)


@pytest.mark.parametrize("branch", ["no_order_id", "spapi_refused", "credentials_missing", "email_only",
                                    "both_failing"])
async def test_branch_ending_without_an_operator(store_deliveries: Deliveries, spapi: SpapiStandIn,
                                                 smtp: SmtpSink, branch: str) -> None:
    fields: dict[str, Any] = {"order_ref": ORDER_ID}
    expected: tuple[str, str | None] = ("delivered", "SMTP_FALLBACK")
    if branch == "no_order_id":
        fields = {"subject": "Where is my parcel?"}
    elif branch == "spapi_refused":
        spapi.add_fault("createConfirmOrderDetails", status=400, times=1)
    elif branch == "credentials_missing":
        fields["tenant_id"] = "tenant-without-secrets"
    elif branch == "email_only":
        fields = {"channel": "email", "to": "buyer@example.org"}
        expected = ("delivered", "SMTP")
    else:
        spapi.add_fault("createConfirmOrderDetails", status=400, times=1)
        smtp.add_fault(550, times=1, stage="rcpt", message="5.1.1 mailbox unavailable")
        expected = ("failed", None)

    handle = await store_deliveries.start(store_deliveries.request(**fields))
    result: DeliveryTrace = await handle.result()

    assert (result.status, result.provider_final) == expected, result.model_dump_json(indent=1)
    await assert_history_query_and_row_agree(store_deliveries.client, store_deliveries.settings,
                                             result.delivery_id, result)


async def test_awaiting_action_row_then_operator_retry(store_deliveries: Deliveries, spapi: SpapiStandIn,
                                                       smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
    handle = await store_deliveries.start(store_deliveries.request(order_ref=ORDER_ID))
    settings = store_deliveries.settings

    async def parked_row() -> DeliveryTrace | None:
        row = await stored_trace(settings, handle.id)
        return row if row is not None and row.status == "awaiting_action" else None

    # While parked, the row is the awaiting_action state, the same as the query and the history.
    await wait_until(parked_row, "delivery_trace row at awaiting_action")
    parked = await assert_history_query_and_row_agree(store_deliveries.client, settings, handle.id)
    assert parked.status == "awaiting_action" and smtp.messages() == []

    answer = await handle.execute_update("retry", OperatorActionInput(by="bob"), result_type=OperatorActionResult)
    result: DeliveryTrace = await handle.result()

    assert answer.accepted and (result.status, result.provider_final) == ("delivered", "SPAPI")
    await assert_history_query_and_row_agree(store_deliveries.client, settings, handle.id, result)


async def test_cancelled_during_backoff(store_deliveries: Deliveries, smtp: SmtpSink) -> None:
    smtp.add_fault(451, times=1000, stage="rcpt")
    handle = await store_deliveries.start(store_deliveries.request(channel="email", to="buyer@example.org"))

    async def in_backoff() -> bool:
        return any(e.step == "smtp_send" and e.outcome == "failed" for e in (await _query(handle)).events)

    await wait_until(in_backoff, "smtp_send in backoff")
    await handle.cancel(reason="duplicate ticket")
    with pytest.raises(WorkflowFailureError):
        await handle.result()

    trace = await assert_history_query_and_row_agree(store_deliveries.client, store_deliveries.settings, handle.id)
    assert trace.status == "cancelled" and trace.note == "Cancelled by operator: duplicate ticket"
    assert smtp.messages() == []


@pytest_asyncio.fixture
async def skipping_store_deliveries(skipping_env: WorkflowEnvironment, settings: Settings, store_url: str,
                                    request: pytest.FixtureRequest) -> AsyncIterator[Deliveries]:
    on_store = settings.model_copy(update={"trace": TraceSettings(database_url=store_url)})
    async with worker_with(skipping_env, on_store, request.node.name) as deliveries:
        yield deliveries


@pytest.mark.parametrize("branch", ["spapi_retries_exhausted", "no_operator_within_72h"])
async def test_branch_over_hours_of_waiting(skipping_store_deliveries: Deliveries, spapi: SpapiStandIn,
                                            smtp: SmtpSink, branch: str) -> None:
    deliveries = skipping_store_deliveries
    if branch == "spapi_retries_exhausted":
        spapi.add_fault("createConfirmOrderDetails", status=500, times=100)
        expected: tuple[str, str | None] = ("delivered", "SMTP_FALLBACK")
    else:
        spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
        expected = ("failed", None)

    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID, to=RELAY_ADDRESS))
    result: DeliveryTrace = await handle.result()

    assert (result.status, result.provider_final) == expected, result.model_dump_json(indent=1)
    await assert_history_query_and_row_agree(deliveries.client, deliveries.settings, result.delivery_id, result)
