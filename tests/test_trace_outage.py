"""The trace store down during a delivery: the reply still goes out, the row follows once the store is back.

The worker reaches PostgreSQL through a TCP proxy of our own that the test switches off (the port
refuses connections and open ones are cut: the database is really unreachable) and on again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.trace_store import TraceStore
from delivery import search_attributes as sa
from delivery.history import trace_from_history
from delivery.models import DeliveryTrace
from delivery.settings import Settings, TraceSettings
from devstack.smtp import SmtpSink
from tests.conftest import Deliveries
from tests.test_trace_store import PG_HOST, PG_PORT, assert_history_query_and_row_agree, postgres_database
from worker import delivery_worker
from workflows import policies

pytestmark = pytest.mark.postgres


class SwitchableProxy:
    """127.0.0.1:<port> forwarding to PostgreSQL, until switched off: then nothing listens on the port
    and every open connection is cut, as when the database host goes away."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def is_on(self) -> bool:
        return self._server is not None

    async def switch_on(self) -> None:
        assert self._server is None, "already on"
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def switch_off(self) -> None:
        assert self._server is not None, "already off"
        server, self._server = self._server, None
        server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await server.wait_closed()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.transport.abort()
            return
        self._open.update((client_writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))
        finally:
            for writer in (client_writer, upstream_writer):
                self._open.discard(writer)
                writer.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[SwitchableProxy]:
    switch = SwitchableProxy(PG_HOST, PG_PORT)
    await switch.switch_on()
    try:
        yield switch
    finally:
        if switch.is_on:
            await switch.switch_off()


@pytest_asyncio.fixture
async def postgres_url() -> AsyncIterator[str]:
    async with postgres_database("test_trace_outage") as url:
        yield url


@pytest_asyncio.fixture
async def outage_deliveries(temporal_env: WorkflowEnvironment, settings: Settings, postgres_url: str,
                            proxy: SwitchableProxy, request: pytest.FixtureRequest) -> AsyncIterator[Deliveries]:
    """A worker whose trace store is PostgreSQL behind the proxy (on while the worker migrates at start)."""
    through_proxy = postgres_url.replace(f"@{PG_HOST}:{PG_PORT}/", f"@127.0.0.1:{proxy.port}/")
    assert through_proxy != postgres_url
    on_proxy = settings.model_copy(update={"trace": TraceSettings(database_url=through_proxy)})
    async with delivery_worker(temporal_env.client, on_proxy):
        assert proxy.accepted >= 1, "the worker's migration did not go through the proxy"
        yield Deliveries(temporal_env.client, on_proxy, request.node.name)


async def row_in(database_url: str, delivery_id: str) -> tuple[DeliveryTrace, int] | None:
    store = TraceStore.from_url(database_url)
    try:
        return await store.get(delivery_id)
    finally:
        await store.close()


async def wait_for(condition: Any, what: str, within_s: float = 20.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within_s}s (last: {value!r})")
        await asyncio.sleep(0.1)


def failing_persists(description: Any, attempts: int = 2) -> list[Any]:
    """The persist_trace activities pending at attempt `attempts` or later (so after failed ones)."""
    return [p for p in description.raw_description.pending_activities
            if p.activity_type.name == "persist_trace" and p.attempt >= attempts and p.last_failure.message]


async def delivered_and_persist_retrying(handle: WorkflowHandle[Any, Any], attempts: int = 2) -> Any:
    """The description once the delivery says delivered and a persist_trace is being retried, else None."""
    description = await handle.describe()
    status = description.typed_search_attributes.get(sa.DELIVERY_STATUS)
    return description if status == "delivered" and failing_persists(description, attempts) else None


async def test_trace_store_down_the_reply_is_delivered_and_the_row_follows_when_it_is_back(
        outage_deliveries: Deliveries, proxy: SwitchableProxy, postgres_url: str, smtp: SmtpSink) -> None:
    await proxy.switch_off()
    handle: WorkflowHandle[Any, DeliveryTrace] = await outage_deliveries.start(
        outage_deliveries.request(channel="email", to="buyer@example.org"))

    # The reply goes out; the delivery says delivered; it waits, Running, for its final trace write.
    async def mail_sent() -> bool:
        return len(smtp.messages()) == 1

    await wait_for(mail_sent, "the mail reaching the SMTP sink")

    # Kept down until persist_trace has failed at least twice: it goes on retrying.
    description = await wait_for(lambda: delivered_and_persist_retrying(handle, attempts=3),
                                 "DeliveryStatus=delivered, persist_trace failed twice and retrying")
    assert description.status == WorkflowExecutionStatus.RUNNING
    assert description.typed_search_attributes.get(sa.DELIVERY_PROVIDER) == "SMTP"
    for pending in failing_persists(description):
        assert pending.last_failure.message.startswith("trace store unavailable: "), pending.last_failure.message
        assert pending.last_failure.application_failure_info.type == "transient"
        assert not pending.last_failure.application_failure_info.non_retryable
    mail = smtp.messages()[0]
    assert mail["rcpt_tos"] == ["buyer@example.org"]
    assert await row_in(postgres_url, handle.id) is None  # really unreachable: nothing got through
    trace_now = await handle.query("trace", result_type=DeliveryTrace)
    assert (trace_now.status, trace_now.provider_final) == ("delivered", "SMTP")
    assert trace_now.email_message_id == mail["message_id"]

    # Retried forever, at an interval capped by the policy (not failed after some attempts).
    history = await handle.fetch_history()
    persists = [e.activity_task_scheduled_event_attributes for e in history.events
                if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and e.activity_task_scheduled_event_attributes.activity_type.name == "persist_trace"]
    assert len(persists) == 2  # delivering, then the final write
    for scheduled in persists:
        retry = scheduled.retry_policy
        assert retry.maximum_attempts == 0  # unlimited
        assert retry.maximum_interval.ToTimedelta() == policies.PERSIST_TRACE.maximum_interval == timedelta(seconds=30)

    # The store comes back: the next retry writes the row and the delivery completes, delivered.
    await proxy.switch_on()
    back = time.monotonic()
    result = await asyncio.wait_for(handle.result(), timeout=40)
    waited = time.monotonic() - back
    # The interval between retries is capped at 30 s: at most one interval (and some slack) after the store is back.
    assert waited < 35, f"the row took {waited:.1f}s after the store was back"

    assert (result.status, result.provider_final) == ("delivered", "SMTP")
    assert not any(e.outcome == "failed" for e in result.events), "the trace store outage leaked into the trace"
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED
    assert len(smtp.messages()) == 1  # sent once
    await assert_history_query_and_row_agree(outage_deliveries.client, outage_deliveries.settings, handle.id, result)
    row = await row_in(postgres_url, handle.id)
    assert row is not None and row[0] == result


async def test_cancel_while_the_final_write_waits_still_writes_the_row(
        outage_deliveries: Deliveries, proxy: SwitchableProxy, postgres_url: str, smtp: SmtpSink) -> None:
    await proxy.switch_off()
    handle: WorkflowHandle[Any, DeliveryTrace] = await outage_deliveries.start(
        outage_deliveries.request(channel="email", to="buyer@example.org"))
    await wait_for(lambda: delivered_and_persist_retrying(handle), "DeliveryStatus=delivered, persist_trace retrying")

    # An operator sees a delivery Running for long and cancels it; then the store comes back.
    await handle.cancel(reason="looks stuck")
    await proxy.switch_on()
    try:
        await asyncio.wait_for(handle.result(), timeout=40)
    except WorkflowFailureError:
        pass  # whether it then ends CANCELED or COMPLETED is the workflow's call; the row is not optional
    assert len(smtp.messages()) == 1

    rebuilt = await trace_from_history(await handle.fetch_history(), outage_deliveries.client.data_converter)
    row = await row_in(postgres_url, handle.id)  # the workflow is closed: no write can come later
    assert row is not None, f"no delivery_trace row for a delivery that is {rebuilt.status}"
    assert row[0] == rebuilt
