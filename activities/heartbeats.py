"""Heartbeats while an activity waits on I/O, so that a cancel reaches it while it waits.

Temporal delivers an activity's cancellation only in the answer to a heartbeat. A send that hangs on
a slow relay or API would otherwise not hear an operator's action (or a cancelled delivery) until its
own timeout. The worker sends the heartbeats at most every `max_heartbeat_throttle_interval` (worker.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from temporalio import activity

T = TypeVar("T")

HEARTBEAT_EVERY_S = 0.5


async def while_heartbeating(awaitable: Awaitable[T], detail: Callable[[], str],
                             every_s: float = HEARTBEAT_EVERY_S) -> T:
    """Await `awaitable`, heartbeating `detail()` (the step under way) every `every_s` seconds meanwhile.

    When the activity is cancelled, the awaited work is cancelled too and the cancel propagates.
    """
    work = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait([work], timeout=every_s)
            if done:
                return work.result()
            activity.heartbeat(detail())
    finally:
        if not work.done():
            work.cancel()
            await asyncio.wait([work])  # let the connection close before the cancel goes on
