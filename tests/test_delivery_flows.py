"""The decision flow of ARCHITECTURE §2, end to end on a real Temporal server and the stand-ins."""

from __future__ import annotations

import asyncio
import json

from temporalio.client import Client

from activities.trace_store import TraceStore
from delivery.models import DeliveryTrace
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from tests.conftest import ORDER_ID, RELAY_ADDRESS, SECRET_VALUES, Deliveries, readable_history
from workflows.reply_delivery import NO_ORDER_ID_NOTE


async def assert_no_secret_in_history(client: Client, delivery_id: str) -> None:
    history = await client.get_workflow_handle(delivery_id).fetch_history()
    exported = readable_history(history.to_json())
    assert "Hello, your parcel left our warehouse today." in exported  # the scan sees inside payloads
    for secret in SECRET_VALUES:
        assert secret not in exported, "a secret reached the workflow history"
    assert "Atza|" not in exported, "an LWA access token reached the workflow history"


async def test_amazon_with_order_id_is_delivered_by_spapi(deliveries: Deliveries, spapi: SpapiStandIn,
                                                          smtp: SmtpSink) -> None:
    trace = await deliveries.deliver(order_ref=f"#{ORDER_ID}")

    assert (trace.status, trace.provider_final) == ("delivered", "SPAPI")
    assert trace.order_id == ORDER_ID
    assert trace.spapi_message_type == "confirmOrderDetails"
    assert trace.spapi_request_id
    sent = spapi.messages()
    assert [(m["order_id"], m["message_type"]) for m in sent] == [(ORDER_ID, "confirmOrderDetails")]
    assert sent[0]["text"] == "Hello, your parcel left our warehouse today."
    assert smtp.messages() == []
    await assert_no_secret_in_history(deliveries.client, trace.delivery_id)


async def test_amazon_without_order_id_falls_back_to_smtp(deliveries: Deliveries, spapi: SpapiStandIn,
                                                          smtp: SmtpSink) -> None:
    trace = await deliveries.deliver(subject="Question about delivery")

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note == NO_ORDER_ID_NOTE
    mails = smtp.messages()
    assert len(mails) == 1
    assert mails[0]["rcpt_tos"] == [RELAY_ADDRESS]
    assert mails[0]["message_id"] == f"<{trace.delivery_id}@acme-shop.example>" == trace.email_message_id
    assert spapi.requests() == []
    await assert_no_secret_in_history(deliveries.client, trace.delivery_id)


async def test_order_id_found_in_thread_key_then_subject(deliveries: Deliveries, spapi: SpapiStandIn) -> None:
    by_thread = await deliveries.deliver(thread_key=f"amazon:{ORDER_ID}")
    by_subject = await deliveries.deliver(subject=f"Re: Order {ORDER_ID} - where is my parcel?")

    assert by_thread.provider_final == by_subject.provider_final == "SPAPI"
    assert by_thread.order_id == by_subject.order_id == ORDER_ID


async def test_spapi_rejection_goes_straight_to_smtp_without_retry(deliveries: Deliveries, spapi: SpapiStandIn,
                                                                   smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", status=400, times=1)
    trace = await deliveries.deliver(order_ref=ORDER_ID)

    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note and trace.note.startswith("SP-API refused")
    spapi_attempts = [e for e in trace.events if e.step == "spapi_send"]
    assert [(e.outcome, e.attempt) for e in spapi_attempts] == [("permanent", 1)]
    assert len(smtp.messages()) == 1


async def test_order_not_allowing_any_type_falls_back_with_reason(deliveries: Deliveries, spapi: SpapiStandIn,
                                                                  smtp: SmtpSink) -> None:
    spapi.set_order(ORDER_ID, actions=[])
    trace = await deliveries.deliver(order_ref=ORDER_ID)

    assert trace.provider_final == "SMTP_FALLBACK"
    assert trace.note and "SP-API refused" in trace.note
    assert [m["order_id"] for m in spapi.messages()] == []
    assert len(smtp.messages()) == 1


async def test_spapi_and_smtp_both_failing_for_good_is_failed(deliveries: Deliveries, spapi: SpapiStandIn,
                                                              smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", status=400, times=1)
    smtp.add_fault(550, times=1, stage="rcpt", message="5.1.1 mailbox unavailable")
    trace = await deliveries.deliver(order_ref=ORDER_ID)

    assert trace.status == "failed"
    assert trace.provider_final is None
    assert trace.note and "SP-API refused" in trace.note and "550" in trace.note
    outcomes = [(e.step, e.outcome) for e in trace.events if e.step in ("spapi_send", "smtp_send")]
    assert outcomes == [("spapi_send", "permanent"), ("smtp_send", "permanent")]
    stored = await TraceStore.from_url(deliveries.settings.trace.database_url).get(trace.delivery_id)
    assert stored is not None and stored[0] == trace


async def test_email_channel_goes_by_smtp_only(deliveries: Deliveries, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    trace = await deliveries.deliver(channel="email", to="buyer@example.org", order_ref=ORDER_ID,
                                     in_reply_to="<CAB123@mail.example.org>")

    assert (trace.status, trace.provider_initial, trace.provider_final) == ("delivered", "smtp", "SMTP")
    assert trace.order_id is None
    assert spapi.requests() == []
    [mail] = smtp.messages()
    assert mail["rcpt_tos"] == ["buyer@example.org"]
    assert mail["headers"]["In-Reply-To"] == "<CAB123@mail.example.org>"


async def test_same_delivery_id_started_twice_is_one_workflow_one_message(deliveries: Deliveries,
                                                                          spapi: SpapiStandIn) -> None:
    request = deliveries.request(order_ref=ORDER_ID)
    handles = await asyncio.gather(*(deliveries.start(request) for _ in range(5)))
    assert len({h.result_run_id for h in handles}) == 1
    await handles[0].result()

    again = await deliveries.start(request)  # after completion: the existing delivery, nothing resent
    assert (await again.result()).status == "delivered"
    assert len(spapi.messages()) == 1


async def test_trace_table_holds_the_same_trace_as_the_query(deliveries: Deliveries) -> None:
    trace = await deliveries.deliver(order_ref=ORDER_ID)
    queried = await deliveries.client.get_workflow_handle(trace.delivery_id).query("trace", result_type=DeliveryTrace)
    stored = await TraceStore.from_url(deliveries.settings.trace.database_url).get(trace.delivery_id)

    assert stored is not None
    assert stored[0] == queried == trace


async def test_plain_json_start_as_another_language_sends_it(deliveries: Deliveries, smtp: SmtpSink) -> None:
    # A TypeScript or Go caller has no pydantic: it sends the ReplyRequest as plain JSON.
    plain = await Client.connect(deliveries.client.service_client.config.target_host,
                                 namespace=deliveries.client.namespace)
    payload = json.loads(deliveries.request(channel="email", to="buyer@example.org").model_dump_json())
    handle = await plain.start_workflow("ReplyDeliveryWorkflow", payload, id=payload["delivery_id"],
                                        task_queue=deliveries.settings.temporal.task_queue)
    result = await handle.result()

    assert result["status"] == "delivered" and result["provider_final"] == "SMTP"
    assert len(smtp.messages()) == 1
