"""Operating deliveries: operator actions (Updates and Signals), awaiting_action, cancel, visibility."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import CancelledError

from delivery import search_attributes as sa
from delivery.models import DeliveryTrace, OperatorActionInput, OperatorActionResult
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from starter import BadInput, build_parser, cmd_signal
from tests.conftest import ORDER_ID, TENANT, Deliveries, stored_trace, wait_for_trace


def in_backoff(step: str) -> Callable[[DeliveryTrace], bool]:
    return lambda t: any(e.step == step and e.outcome == "failed" for e in t.events)


async def act(handle: WorkflowHandle[Any, Any], action: str, **args: Any) -> OperatorActionResult:
    result: OperatorActionResult = await handle.execute_update(action, OperatorActionInput(**args),
                                                               result_type=OperatorActionResult)
    return result


async def test_force_smtp_cuts_an_spapi_backoff_short(deliveries: Deliveries, spapi: SpapiStandIn,
                                                      smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", status=503, times=100)
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await wait_for_trace(handle, in_backoff("spapi_send"))

    answer = await act(handle, "force_smtp", by="alice", reason="buyer waiting")
    trace = await handle.result()

    assert answer.accepted and "force_smtp" in answer.message
    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    operator = [e for e in trace.events if e.step == "operator"]
    assert [(e.outcome, e.detail) for e in operator] == [("force_smtp", "force_smtp by alice (buyer waiting)")]
    assert len([e for e in trace.events if e.step == "spapi_send"]) == 1  # no second SP-API attempt
    assert len(smtp.messages()) == 1 and spapi.messages() == []
    await deliveries.check_trace_agrees(trace)


# Long enough that a delivery which waited for the hung call could not have ended before it.
HUNG_CALL_S = 12.0


async def hung(spapi: SpapiStandIn, operation: str) -> None:
    """Make the next `operation` call hang, and return once the stand-in has received it."""
    spapi.add_fault(operation, mode="delay", delay_s=HUNG_CALL_S)
    deadline = asyncio.get_running_loop().time() + 20
    while any(f["operation"] == operation for f in spapi.pending_faults()):
        assert asyncio.get_running_loop().time() < deadline, f"no {operation} call arrived"
        await asyncio.sleep(0.05)


async def hung_call_ended(spapi: SpapiStandIn) -> bool:
    """Wait for the hung call to end in the stand-in (so it cannot land in the next test); False if it had not yet."""
    ended_already = any(r["fault"] == "delay" for r in spapi.requests())
    deadline = asyncio.get_running_loop().time() + HUNG_CALL_S + 10
    while not any(r["fault"] == "delay" for r in spapi.requests()):
        assert asyncio.get_running_loop().time() < deadline, "the hung call never ended"
        await asyncio.sleep(0.1)
    return ended_already


async def cancel_requests(handle: WorkflowHandle[Any, Any], activity: str) -> int:
    history = await handle.fetch_history()
    scheduled = {e.event_id for e in history.events
                 if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                 and e.activity_task_scheduled_event_attributes.activity_type.name == activity}
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED
               and e.activity_task_cancel_requested_event_attributes.scheduled_event_id in scheduled)


async def test_force_smtp_cancels_an_spapi_send_in_flight(deliveries: Deliveries, spapi: SpapiStandIn,
                                                          smtp: SmtpSink) -> None:
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await hung(spapi, "createConfirmOrderDetails")  # the POST is at Amazon, and no answer comes

    answer = await act(handle, "force_smtp", by="alice", reason="SP-API stuck")
    trace = await handle.result()

    assert not await hung_call_ended(spapi), "the delivery waited for the hung SP-API call to end"
    assert answer.accepted
    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert await cancel_requests(handle, "spapi_send") == 1
    sends = [e for e in trace.events if e.step == "spapi_send"]
    assert [(e.outcome, e.attempt) for e in sends] == [("ambiguous", 1)]  # cut mid-POST: Amazon may have it
    assert sends[0].detail and "may have been accepted" in sends[0].detail
    assert sends[0].detail.endswith("stopped for operator action force_smtp")
    operator = [(e.outcome, e.detail) for e in trace.events if e.step == "operator"]
    assert operator == [("force_smtp", "force_smtp by alice (SP-API stuck)")]
    assert len(smtp.messages()) == 1
    await deliveries.check_trace_agrees(trace)


async def test_retry_cancels_a_hung_spapi_lookup_and_delivers_by_spapi(deliveries: Deliveries, spapi: SpapiStandIn,
                                                                     smtp: SmtpSink) -> None:
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await hung(spapi, "getMessagingActionsForOrder")  # nothing sent yet: a clean cancel

    await act(handle, "retry", by="bob")
    trace = await handle.result()

    assert not await hung_call_ended(spapi), "the delivery waited for the hung SP-API call to end"
    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    assert await cancel_requests(handle, "spapi_send") == 1
    assert [(e.outcome, e.attempt, e.detail) for e in trace.events if e.step == "spapi_send"][:1] == [
        ("cancelled", 1, "stopped for operator action retry")]
    assert [e.outcome for e in trace.events if e.step == "spapi_send"][1:] == ["ok"]
    assert len(spapi.messages()) == 1 and smtp.messages() == []
    await deliveries.check_trace_agrees(trace)


async def hung_smtp(smtp: SmtpSink, stage: str) -> None:
    """Make the relay hang at `stage` of the next transaction, and return once it has got that far."""
    smtp.add_fault(stage=stage, delay_s=HUNG_CALL_S)
    deadline = asyncio.get_running_loop().time() + 20
    while smtp.faults():
        assert asyncio.get_running_loop().time() < deadline, f"no SMTP transaction reached {stage}"
        await asyncio.sleep(0.05)


def took(trace: DeliveryTrace) -> float:
    """Workflow time from the delivery's first event to its last."""
    return (trace.events[-1].at - trace.events[0].at).total_seconds()


async def test_mark_delivered_cancels_an_smtp_send_hung_before_data(deliveries: Deliveries,
                                                                    smtp: SmtpSink) -> None:
    handle = await deliveries.start(deliveries.request(channel="email", to="buyer@example.org"))
    await hung_smtp(smtp, "rcpt")

    await act(handle, "mark_delivered", by="carol", note="answered by phone")
    trace = await handle.result()

    assert took(trace) < HUNG_CALL_S, "the delivery waited for the hung relay"
    assert (trace.status, trace.provider_final) == ("delivered", "SMTP")
    assert await cancel_requests(handle, "smtp_send") == 1
    assert [(e.outcome, e.attempt, e.detail) for e in trace.events if e.step == "smtp_send"] == [
        ("cancelled", 1, "stopped for operator action mark_delivered")]
    assert trace.note == "Marked delivered by carol: answered by phone"
    assert smtp.messages() == []
    await deliveries.check_trace_agrees(trace)


async def test_set_order_id_cutting_an_smtp_send_after_data_says_the_mail_may_be_out(
        deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    handle = await deliveries.start(deliveries.request(subject="Where is my parcel?"))
    await hung_smtp(smtp, "data")  # the relay has the mail; its "250 queued" is slow to come

    await act(handle, "set_order_id", order_id=ORDER_ID, by="dave")
    trace = await handle.result()

    assert took(trace) < HUNG_CALL_S, "the delivery waited for the hung relay"
    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    sends = [e for e in trace.events if e.step == "smtp_send"]
    assert [(e.outcome, e.attempt) for e in sends] == [("ambiguous", 1)]
    assert sends[0].detail == ("SMTP attempt cancelled after the message was sent; the relay may have accepted "
                               "it; stopped for operator action set_order_id")
    assert len(smtp.messages()) == 1 and [m["order_id"] for m in spapi.messages()] == [ORDER_ID]
    await deliveries.check_trace_agrees(trace)


async def test_ambiguous_spapi_outcome_waits_for_an_operator_then_retry(deliveries: Deliveries,
                                                                        spapi: SpapiStandIn,
                                                                        smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    parked = await wait_for_trace(handle, lambda t: t.status == "awaiting_action")

    assert parked.note and "outcome unknown" in parked.note
    assert [e.outcome for e in parked.events if e.step == "spapi_send"] == ["ambiguous"]
    assert smtp.messages() == []  # never an automatic second channel
    described = await handle.describe()
    assert described.typed_search_attributes.get(sa.DELIVERY_STATUS) == "awaiting_action"
    row = await stored_trace(deliveries.settings, parked.delivery_id)
    assert row is not None and row.status == "awaiting_action"

    await act(handle, "retry", by="bob")
    trace = await handle.result()
    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    assert smtp.messages() == []
    await deliveries.check_trace_agrees(trace)


async def test_mark_delivered_ends_a_parked_delivery_without_sending(deliveries: Deliveries,
                                                                     spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await wait_for_trace(handle, lambda t: t.status == "awaiting_action")
    accepted_before = len(spapi.messages())

    await act(handle, "mark_delivered", note="seen in Seller Central", by="carol")
    trace = await handle.result()

    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    assert trace.note and "seen in Seller Central" in trace.note
    assert len(spapi.messages()) == accepted_before and smtp.messages() == []
    await deliveries.check_trace_agrees(trace)


async def test_parked_delivery_without_action_fails_after_72_hours(skipping_deliveries: Deliveries,
                                                                   spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
    trace = await skipping_deliveries.deliver(order_ref=ORDER_ID)

    assert trace.status == "failed"
    assert trace.note and trace.note.startswith("No operator action within 72h")
    assert smtp.messages() == []


async def test_set_order_id_during_smtp_backoff_takes_the_spapi_path(deliveries: Deliveries,
                                                                    spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    smtp.add_fault(451, times=100, stage="rcpt")
    handle = await deliveries.start(deliveries.request(subject="Where is my parcel?"))
    await wait_for_trace(handle, in_backoff("smtp_send"))

    await act(handle, "set_order_id", order_id=ORDER_ID, by="dave")
    trace = await handle.result()

    assert (trace.status, trace.provider_final, trace.order_id) == ("delivered", "SPAPI", ORDER_ID)
    assert [m["order_id"] for m in spapi.messages()] == [ORDER_ID]
    assert smtp.messages() == []
    await deliveries.check_trace_agrees(trace)


async def test_action_on_a_delivered_delivery_is_refused_with_a_message(deliveries: Deliveries) -> None:
    trace = await deliveries.deliver(order_ref=ORDER_ID)
    handle = deliveries.client.get_workflow_handle(trace.delivery_id)
    events_before = len((await handle.fetch_history()).events)

    with pytest.raises(BadInput) as refused:
        await cmd_signal(deliveries.client, build_parser().parse_args(["signal", trace.delivery_id, "retry"]))
    assert str(refused.value) == f"retry refused: delivery {trace.delivery_id} has already ended (delivered)"
    assert len((await handle.fetch_history()).events) == events_before


async def test_validator_refuses_what_makes_no_sense_and_writes_nothing(deliveries: Deliveries,
                                                                        smtp: SmtpSink) -> None:
    smtp.add_fault(451, times=100, stage="rcpt")
    handle = await deliveries.start(deliveries.request(subject="no order", channel="email", to="b@example.org"))
    await wait_for_trace(handle, in_backoff("smtp_send"))
    events_before = len((await handle.fetch_history()).events)

    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await act(handle, "mark_delivered", note="  ")
    assert "needs a note" in str(refused.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await act(handle, "set_order_id", order_id=ORDER_ID)
    assert "channel email does not use Amazon orders" in str(refused.value.cause)
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await act(handle, "force_smtp", by="erin")
    assert str(refused.value.cause).endswith(
        f"force_smtp refused: delivery {handle.id} already goes by SMTP; `retry` sends again now")
    with pytest.raises(BadInput) as bad:
        await cmd_signal(deliveries.client, build_parser().parse_args(["signal", handle.id, "set_order_id", "12-345"]))
    assert "ORDER_ID (order_id)" in str(bad.value)
    assert len((await handle.fetch_history()).events) == events_before
    await handle.cancel()


async def test_signal_of_the_same_name_acts_like_the_update(deliveries: Deliveries, spapi: SpapiStandIn,
                                                            smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", status=503, times=100)
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await wait_for_trace(handle, in_backoff("spapi_send"))

    await handle.signal("force_smtp", OperatorActionInput(by="erin"))
    trace = await handle.result()
    assert trace.provider_final == "SMTP_FALLBACK"
    assert any(e.step == "operator" and e.outcome == "force_smtp" for e in trace.events)


async def test_cancel_during_smtp_backoff_ends_cancelled_and_sends_nothing(deliveries: Deliveries,
                                                                          smtp: SmtpSink) -> None:
    smtp.add_fault(451, times=1000, stage="rcpt")
    handle = await deliveries.start(deliveries.request(channel="email", to="buyer@example.org"))
    await wait_for_trace(handle, in_backoff("smtp_send"))

    await handle.cancel(reason="duplicate ticket")
    with pytest.raises(WorkflowFailureError) as ended:
        await handle.result()
    assert isinstance(ended.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED

    row = await stored_trace(deliveries.settings, handle.id)
    assert row is not None and row.status == "cancelled"
    assert row.note == "Cancelled by operator: duplicate ticket"
    await deliveries.check_trace_agrees(row)  # the history rebuild agrees with the row, also when cancelled
    smtp.reset()
    await asyncio.sleep(1)
    assert smtp.messages() == []


async def test_cancel_during_a_hung_spapi_call_cancels_the_activity(deliveries: Deliveries, spapi: SpapiStandIn,
                                                                    smtp: SmtpSink) -> None:
    handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
    await hung(spapi, "getMessagingActionsForOrder")

    await handle.cancel(reason="sent by hand")
    with pytest.raises(WorkflowFailureError) as ended:
        await handle.result()

    assert not await hung_call_ended(spapi), "the cancel waited for the hung SP-API call to end"
    assert isinstance(ended.value.cause, CancelledError)
    assert await cancel_requests(handle, "spapi_send") == 1
    row = await stored_trace(deliveries.settings, handle.id)
    assert row is not None and (row.status, row.note) == ("cancelled", "Cancelled by operator: sent by hand")
    await deliveries.check_trace_agrees(row)
    assert spapi.messages() == [] and smtp.messages() == []


async def test_visibility_finds_deliveries_by_each_search_attribute(deliveries: Deliveries) -> None:
    spapi_trace = await deliveries.deliver(order_ref=ORDER_ID)
    email_trace = await deliveries.deliver(channel="email", to="buyer@example.org")
    queue = deliveries.settings.temporal.task_queue

    async def ids(query: str) -> set[str]:
        found: set[str] = set()
        for _ in range(50):  # visibility is eventually consistent
            found = {w.id async for w in deliveries.client.list_workflows(f"TaskQueue = '{queue}' AND {query}")}
            if found:
                return found
            await asyncio.sleep(0.2)
        return found

    assert await ids(f"AmazonOrderId = '{ORDER_ID}'") == {spapi_trace.delivery_id}
    assert await ids("DeliveryProvider = 'SPAPI'") == {spapi_trace.delivery_id}
    assert await ids("DeliveryChannel = 'email'") == {email_trace.delivery_id}
    assert await ids(f"TenantId = '{TENANT}' AND DeliveryStatus = 'delivered'") == {
        spapi_trace.delivery_id, email_trace.delivery_id}
