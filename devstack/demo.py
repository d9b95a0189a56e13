"""The demo deliveries `make run` sends: one per branch of the decision flow, their traces printed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from temporalio.client import Client

from delivery.converter import data_converter
from delivery.models import DeliveryTrace, ReplyRequest
from delivery.settings import CodecSettings
from starter import format_trace, start_delivery

RELAY = "b9x2k4m7q1z8@marketplace.amazon.fr"


@dataclass
class Demo:
    title: str
    fields: dict[str, Any]
    spapi_faults: list[dict[str, Any]] = field(default_factory=list)
    smtp_faults: list[dict[str, Any]] = field(default_factory=list)
    wait_s: float = 20.0


DEMOS = [
    Demo("Amazon order, SP-API allows a message type -> SPAPI",
         {"order_ref": "402-1111111-1111111", "subject": "Re: your order"}),
    Demo("Amazon, no order id anywhere -> SMTP_FALLBACK",
         {"subject": "Re: a question about sizes"}),
    Demo("Amazon order that allows no message type -> SMTP_FALLBACK with the reason",
         {"order_ref": "402-2222222-2222222", "subject": "Re: your order"}),
    Demo("Amazon tenant without Amazon credentials -> SMTP_FALLBACK",
         {"tenant_id": "bistro", "order_ref": "402-1111111-1111111", "subject": "Re: your order"}),
    Demo("Email channel -> SMTP",
         {"channel": "email", "to": "jane.doe@example.org", "subject": "Re: Order status",
          "in_reply_to": "<CAF0demo123@mail.example.org>"}),
    Demo("SP-API and SMTP both refuse -> failed",
         {"order_ref": "402-3333333-3333333", "to": "blocked-buyer@marketplace.amazon.fr",
          "subject": "Re: your order"},
         spapi_faults=[{"operation": "createUnexpectedProblem", "status": 400, "times": 1}],
         smtp_faults=[{"code": 550, "times": 1, "stage": "rcpt", "message": "5.1.1 mailbox unavailable"}]),
    Demo("SP-API connection dropped after the request -> awaiting_action (operator decides)",
         {"order_ref": "402-1111111-1111111", "subject": "Re: your order"},
         spapi_faults=[{"operation": "createConfirmOrderDetails", "mode": "drop_after_request", "times": 1}],
         wait_s=8.0),
]


async def run_demos(state: dict[str, Any], task_queue: str = "reply-delivery") -> list[DeliveryTrace]:
    urls = state["urls"]
    client = await Client.connect(urls["temporal"], data_converter=data_converter(CodecSettings()))
    traces = []
    stamp = int(time.time())
    async with httpx.AsyncClient(timeout=10) as http:
        for number, demo in enumerate(DEMOS, start=1):
            for fault in demo.spapi_faults:
                (await http.post(f"{urls['spapi']}/_emulator/faults", json=fault)).raise_for_status()
            for fault in demo.smtp_faults:
                (await http.post(f"{urls['mail_ui']}_emulator/faults", json=fault)).raise_for_status()
            fields: dict[str, Any] = {
                "delivery_id": f"demo-{stamp}-{number}", "tenant_id": "acme", "conversation_id": f"demo-conv-{number}",
                "channel": "amazon", "to": RELAY,
                "body_text": "Hello, thank you for your message. Your parcel left our warehouse today.",
            }
            fields.update(demo.fields)
            handle = await start_delivery(client, ReplyRequest(**fields), task_queue=task_queue)
            try:
                await asyncio.wait_for(handle.result(), timeout=demo.wait_s)
            except TimeoutError:
                pass  # still running (waiting for an operator, or backing off): show where it stands
            trace = await handle.query("trace", result_type=DeliveryTrace)
            traces.append(trace)
            print(f"\n=== {number}. {demo.title}\n{format_trace(trace)}", flush=True)
    return traces
