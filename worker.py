"""python worker.py: the worker process. Settings come from the environment (OUTBOUND_*; see README).

It registers the search attributes, migrates the delivery_trace table, then serves the workflow and
the activities until SIGINT/SIGTERM, letting in-flight activities finish before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from activities.credentials import CredentialsActivities, CredentialStore
from activities.orders import resolve_order_id
from activities.smtp import SmtpActivities
from activities.spapi import SpapiActivities
from activities.trace_store import TraceActivities, TraceStore
from delivery import search_attributes
from delivery.converter import data_converter
from delivery.settings import Settings
from workflows.reply_delivery import ReplyDeliveryWorkflow

log = logging.getLogger("worker")

# On shutdown, give in-flight sends this long to finish before they are cancelled (and retried later).
GRACEFUL_SHUTDOWN = timedelta(seconds=30)
# A send waiting on I/O heartbeats (activities/heartbeats.py); its cancel (an operator action, a
# cancelled delivery) arrives in the answer to a heartbeat, so they go out at least this often.
HEARTBEAT_THROTTLE = timedelta(seconds=1)


async def connect(settings: Settings) -> Client:
    # data_converter() logs, once, whether payloads are encrypted or plain (OUTBOUND_CODEC_KEYS).
    return await Client.connect(settings.temporal.address, namespace=settings.temporal.namespace,
                                data_converter=data_converter(settings.codec))


@asynccontextmanager
async def delivery_worker(client: Client, settings: Settings, *,
                          task_queue: str | None = None) -> AsyncIterator[Worker]:
    """The worker with every client it needs, opened and closed together."""
    await search_attributes.ensure_registered(client, client.namespace)
    async with AsyncExitStack() as stack:
        trace_store = TraceStore.from_url(settings.trace.database_url)
        stack.push_async_callback(trace_store.close)
        await trace_store.migrate()
        credential_store = CredentialStore(settings.vault)
        stack.callback(credential_store.close)
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=settings.spapi.timeout_s))
        credentials = CredentialsActivities(credential_store)
        spapi = SpapiActivities(http, credential_store, settings.spapi)
        smtp = SmtpActivities(settings.smtp)
        trace = TraceActivities(trace_store)
        worker = Worker(
            client,
            task_queue=task_queue or settings.temporal.task_queue,
            workflows=[ReplyDeliveryWorkflow],
            activities=[resolve_order_id, credentials.fetch_credentials, spapi.spapi_send, smtp.smtp_send,
                        trace.persist_trace],
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
            max_heartbeat_throttle_interval=HEARTBEAT_THROTTLE,
        )
        async with worker:
            yield worker


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    client = await connect(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with delivery_worker(client, settings):
        log.info("worker serving task queue %s on %s (namespace %s)", settings.temporal.task_queue,
                 settings.temporal.address, settings.temporal.namespace)
        await stop.wait()
        log.info("shutting down: letting in-flight activities finish (up to %s)", GRACEFUL_SHUTDOWN)
    log.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
    # Skip interpreter teardown, which the client's native threads can abort (temporalio/sdk-python#300).
    logging.shutdown()
    os._exit(0)
