"""Retry schedules over hours of backoff, on the time-skipping server."""

from __future__ import annotations

from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from tests.conftest import ORDER_ID, Deliveries
from workflows import policies


async def test_spapi_500_every_time_is_retried_then_falls_back(skipping_deliveries: Deliveries,
                                                               spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    spapi.add_fault("createConfirmOrderDetails", status=500, times=100)
    trace = await skipping_deliveries.deliver(order_ref=ORDER_ID)

    attempts = policies.SPAPI_SEND.retry.maximum_attempts
    assert (trace.status, trace.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert trace.note and trace.note.startswith(f"SP-API failed after {attempts} attempts")
    spapi_events = [e for e in trace.events if e.step == "spapi_send"]
    assert [e.attempt for e in spapi_events] == list(range(1, attempts + 1))
    assert all(e.outcome == "failed" for e in spapi_events)
    assert "retry in 5s" in (spapi_events[0].detail or "")
    assert len(smtp.messages()) == 1
