"""`starter.py trace` and `starter.py list`, run as a person runs them: a subprocess on the real dev server.

`trace` rebuilds the delivery's trace from the workflow history alone, so these tests stop the worker
before asking. The subprocess runs in a fixed local time zone (UTC+05:30) to show the timeline is in
local time, not UTC.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from delivery.models import DeliveryTrace
from delivery.settings import Settings
from devstack.smtp import SmtpSink
from devstack.spapi import SpapiStandIn
from tests.conftest import ORDER_ID, Deliveries, stored_trace
from worker import delivery_worker

REPO = Path(__file__).resolve().parents[1]
LOCAL_TZ = "IST-05:30"  # POSIX form of UTC+05:30: a local time that cannot be mistaken for UTC
LOCAL_OFFSET = timezone(timedelta(hours=5, minutes=30))
# One timeline line: local time, step, outcome, optional "#attempt", optional detail.
TIMELINE_LINE = re.compile(r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)  (?P<step>\S+) +(?P<outcome>\S+)"
                           r"(?: +(?P<attempt>#\d+))?(?: +(?P<detail>.*))?$")


@dataclass
class Cli:
    code: int
    stdout: str
    stderr: str


async def starter(address: str, namespace: str, *args: str) -> Cli:
    """`python starter.py ARGS` against the test's Temporal server, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOUND_")}
    env.update(OUTBOUND_TEMPORAL_ADDRESS=address, OUTBOUND_TEMPORAL_NAMESPACE=namespace, TZ=LOCAL_TZ)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "starter.py"), *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        raise
    assert process.returncode is not None
    return Cli(process.returncode, out.decode(), err.decode())


def cli_on(client: Client) -> Any:
    address = client.service_client.config.target_host

    async def run(*args: str) -> Cli:
        return await starter(address, client.namespace, *args)

    return run


def assert_timeline(printed: str, trace: DeliveryTrace) -> None:
    """The human form: the summary, a blank line, then one aligned line per event, in local time."""
    head, _, timeline = printed.rstrip("\n").partition("\n\n")
    summary = head.splitlines()
    assert summary[0] == f"delivery   {trace.delivery_id}"
    via = f" via {trace.provider_final}" if trace.provider_final else ""
    assert summary[1] == f"status     {trace.status}{via}"
    assert summary[2].split() == ["tenant", trace.tenant_id, "channel", trace.channel, "conversation",
                                  trace.conversation_id]
    if trace.note:
        assert f"note       {trace.note}" in summary
    if trace.order_id:
        assert f"order      {trace.order_id}" in summary
    if trace.email_message_id:
        assert f"message-id {trace.email_message_id}" in summary

    lines = timeline.splitlines()
    assert len(lines) == len(trace.events), f"{len(trace.events)} events, {len(lines)} timeline lines:\n{timeline}"
    columns: dict[str, set[int]] = {"step": set(), "outcome": set(), "attempt": set(), "detail": set()}
    for line, event in zip(lines, trace.events, strict=True):
        match = TIMELINE_LINE.match(line)
        assert match, f"not a timeline line: {line!r}"
        assert match["at"] == event.at.astimezone(LOCAL_OFFSET).strftime("%Y-%m-%d %H:%M:%S"), line
        assert (match["step"], match["outcome"]) == (event.step, event.outcome), line
        assert match["attempt"] == (f"#{event.attempt}" if event.attempt else None), line
        assert (match["detail"] or None) == event.detail, line
        for column in columns:
            if match[column]:
                columns[column].add(match.start(column))
    # Aligned: each column starts at the same place on every line.
    for column, starts in columns.items():
        assert len(starts) <= 1, f"the {column} column is not aligned (starts at {sorted(starts)}):\n{timeline}"
    assert columns["step"] == {21}


async def test_trace_of_closed_deliveries_is_rebuilt_with_no_worker_running(
        temporal_env: WorkflowEnvironment, settings: Settings, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    deliveries = Deliveries(temporal_env.client, settings, "trace-cli")
    async with delivery_worker(temporal_env.client, settings):
        spapi.add_fault("createConfirmOrderDetails", status=400, times=1)
        fallback = await (await deliveries.start(deliveries.request(order_ref=ORDER_ID))).result()
        smtp.add_fault(550, times=1, stage="rcpt", message="5.1.1 mailbox unavailable")
        failed = await (await deliveries.start(deliveries.request(channel="email", to="gone@example.org"))).result()
    # The worker has stopped: from here on only the history can answer.
    cli = cli_on(temporal_env.client)

    human, as_json, failed_human = await asyncio.gather(
        cli("trace", fallback.delivery_id), cli("trace", fallback.delivery_id, "--json"),
        cli("trace", failed.delivery_id))

    assert (human.code, as_json.code) == (0, 0), human.stderr + as_json.stderr
    assert (fallback.status, fallback.provider_final) == ("delivered", "SMTP_FALLBACK")
    assert [e.step for e in fallback.events] == ["delivery", "delivery", "resolve_order_id", "fetch_credentials",
                                                  "spapi_send", "delivery", "smtp_send", "delivery"]
    assert json.loads(as_json.stdout) == fallback.model_dump(mode="json")  # exactly the contract form
    assert DeliveryTrace.model_validate_json(as_json.stdout) == await stored_trace(settings, fallback.delivery_id)
    assert_timeline(human.stdout, fallback)

    assert failed_human.code == 1, failed_human.stderr  # failed or cancelled: exit 1
    assert failed.status == "failed"
    assert_timeline(failed_human.stdout, failed)


async def test_trace_of_a_parked_delivery_is_rebuilt_with_no_worker_running(
        temporal_env: WorkflowEnvironment, settings: Settings, spapi: SpapiStandIn, smtp: SmtpSink) -> None:
    deliveries = Deliveries(temporal_env.client, settings, "trace-cli-parked")
    spapi.add_fault("createConfirmOrderDetails", mode="drop_after_request", times=1)
    async with delivery_worker(temporal_env.client, settings):
        handle = await deliveries.start(deliveries.request(order_ref=ORDER_ID))
        for _ in range(200):
            parked = await handle.query("trace", result_type=DeliveryTrace)
            if parked.status == "awaiting_action":
                break
            await asyncio.sleep(0.1)
        assert parked.status == "awaiting_action", parked.model_dump_json(indent=1)
    try:
        as_json = await cli_on(temporal_env.client)("trace", handle.id, "--json")

        assert as_json.code == 0, as_json.stderr
        assert json.loads(as_json.stdout) == parked.model_dump(mode="json")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    finally:
        await handle.terminate("test over")


async def test_trace_of_a_delivery_no_worker_has_picked_up_yet(temporal_env: WorkflowEnvironment,
                                                              settings: Settings) -> None:
    deliveries = Deliveries(temporal_env.client, settings, "trace-cli-pending")
    handle = await deliveries.start(deliveries.request(channel="email", to="buyer@example.org"))  # no worker
    try:
        result = await cli_on(temporal_env.client)("trace", handle.id, "--json")

        assert result.code == 0, result.stderr
        trace = DeliveryTrace.model_validate_json(result.stdout)
        assert (trace.delivery_id, trace.status) == (handle.id, "pending")
        assert [(e.step, e.outcome) for e in trace.events] == [("delivery", "received")]
    finally:
        await handle.terminate("test over")


async def test_trace_of_an_unknown_id_says_so_and_exits_2(temporal_env: WorkflowEnvironment) -> None:
    result = await cli_on(temporal_env.client)("trace", "dlv-1700000000000-nosuchone")

    assert result.code == 2
    assert result.stdout == ""
    assert "no delivery with id 'dlv-1700000000000-nosuchone'" in result.stderr
    assert "Traceback" not in result.stderr


# --- list: Temporal visibility -------------------------------------------------------------------------


async def test_list_by_tenant_and_status_in_json_and_human_form(temporal_env: WorkflowEnvironment,
                                                                settings: Settings, smtp: SmtpSink) -> None:
    client = temporal_env.client
    tenant = f"list-{uuid.uuid4().hex[:8]}"
    deliveries = Deliveries(client, settings, "list-cli")
    async with delivery_worker(client, settings):
        delivered = await (await deliveries.start(deliveries.request(
            tenant_id=tenant, channel="email", to="buyer@example.org"))).result()
        smtp.add_fault(550, times=1, stage="rcpt", message="5.1.1 mailbox unavailable")
        failed = await (await deliveries.start(deliveries.request(
            tenant_id=tenant, channel="email", to="gone@example.org"))).result()
        other = await (await deliveries.start(deliveries.request(channel="email", to="buyer@example.org"))).result()
    assert (delivered.status, failed.status, other.status) == ("delivered", "failed", "delivered")

    # Visibility is eventually consistent: wait until it shows both closed, with their final status.
    want = {(delivered.delivery_id, "delivered"), (failed.delivery_id, "failed")}
    for _ in range(100):
        seen = {(w.id, w.typed_search_attributes.get(_status_key()))
                async for w in client.list_workflows(f"TenantId = '{tenant}' AND ExecutionStatus != 'Running'")}
        if seen == want:
            break
        await asyncio.sleep(0.1)
    assert seen == want

    cli = cli_on(client)
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="seconds")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat(timespec="seconds")
    all_json, failed_json, delivered_json, human, since_yesterday, since_tomorrow = await asyncio.gather(
        cli("list", "--tenant", tenant, "--json"), cli("list", "--tenant", tenant, "--status", "failed", "--json"),
        cli("list", "--status", "delivered", "--tenant", tenant, "--json"), cli("list", "--tenant", tenant),
        cli("list", "--tenant", tenant, "--since", yesterday, "--json"),
        cli("list", "--tenant", tenant, "--since", tomorrow, "--json"))

    for result in (all_json, failed_json, delivered_json, human, since_yesterday, since_tomorrow):
        assert result.code == 0, result.stderr
    rows = {row["delivery_id"]: row for row in json.loads(all_json.stdout)}
    assert set(rows) == {delivered.delivery_id, failed.delivery_id}  # not the other tenant's
    assert rows[delivered.delivery_id] | {"started_at": None} == {
        "delivery_id": delivered.delivery_id, "status": "delivered", "provider": "SMTP", "channel": "email",
        "tenant_id": tenant, "order_id": None, "started_at": None, "workflow_status": "COMPLETED"}
    assert datetime.fromisoformat(rows[delivered.delivery_id]["started_at"]) <= datetime.now(UTC)
    assert (rows[failed.delivery_id]["status"], rows[failed.delivery_id]["workflow_status"]) == ("failed",
                                                                                                 "COMPLETED")
    assert [row["delivery_id"] for row in json.loads(failed_json.stdout)] == [failed.delivery_id]
    assert [row["delivery_id"] for row in json.loads(delivered_json.stdout)] == [delivered.delivery_id]
    assert {row["delivery_id"] for row in json.loads(since_yesterday.stdout)} == set(rows)
    assert json.loads(since_tomorrow.stdout) == []

    lines = human.stdout.splitlines()
    assert lines[-1] == "2 deliveries"
    by_id = {line.split()[1]: line.split() for line in lines[:-1]}  # started, id, status, provider, tenant
    assert set(by_id) == set(rows)
    assert by_id[delivered.delivery_id][2:5] == ["delivered", "SMTP", tenant]
    assert by_id[failed.delivery_id][2] == "failed"


def _status_key() -> Any:
    from delivery import search_attributes as sa

    return sa.DELIVERY_STATUS


async def test_list_with_a_bad_since_says_so_and_exits_2(temporal_env: WorkflowEnvironment) -> None:
    result = await cli_on(temporal_env.client)("list", "--since", "yesterday")

    assert result.code == 2
    assert result.stdout == ""
    assert "--since: 'yesterday' is not an ISO date or time" in result.stderr
    assert "Traceback" not in result.stderr


async def test_list_since_a_date_lists_what_started_since(temporal_env: WorkflowEnvironment) -> None:
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    result = await cli_on(temporal_env.client)("list", "--since", yesterday, "--json")

    assert result.code == 0, result.stderr
    assert isinstance(json.loads(result.stdout), list)


async def test_a_bad_since_is_refused_before_connecting() -> None:
    with socket.socket() as probe:  # nothing listens there
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    result = await starter(address, "default", "list", "--since", "yesterday")

    assert (result.code, "--since: 'yesterday' is not an ISO date" in result.stderr) == (2, True), result.stderr
