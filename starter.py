"""python starter.py send|trace|list|signal|cancel|schema, and `start_delivery()` for the help-desk API.

Exit codes: 0 delivered or accepted, 1 failed or cancelled, 2 bad input (the message names the field).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from delivery import WORKFLOW_TYPE
from delivery import search_attributes as sa
from delivery.converter import data_converter
from delivery.history import trace_from_history
from delivery.models import (
    OPERATOR_ACTIONS,
    DeliveryTrace,
    OperatorActionInput,
    OperatorActionResult,
    ReplyRequest,
)
from delivery.settings import Settings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
SCHEMA_DIR = Path(__file__).resolve().parent / "docs" / "schema"
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"

# Model field -> the CLI flag that sets it, so a validation error names what the user typed.
_FLAGS = {
    "delivery_id": "--delivery-id", "tenant_id": "--tenant", "conversation_id": "--conversation",
    "channel": "--channel", "order_ref": "--order-ref", "thread_key": "--thread-key",
    "marketplace_id": "--marketplace", "to": "--to", "from_address": "--from", "subject": "--subject",
    "body_text": "--body", "body_html": "--body-html-file", "in_reply_to": "--in-reply-to",
    "spapi_message_type": "--message-type", "order_id": "ORDER_ID", "note": "NOTE",
}


class BadInput(Exception):
    """Input a person must correct; exit code 2."""


def new_delivery_id() -> str:
    """`dlv-<epoch ms>-<9 base36 chars>` (ARCHITECTURE §1)."""
    suffix = "".join(secrets.choice(_BASE36) for _ in range(9))
    return f"dlv-{int(time.time() * 1000)}-{suffix}"


async def start_delivery(client: Client, request: ReplyRequest, *, task_queue: str | None = None
                         ) -> WorkflowHandle[Any, DeliveryTrace]:
    """Start the delivery, or return the existing one: exactly one workflow per delivery id."""
    try:
        return await client.start_workflow(
            WORKFLOW_TYPE,
            request,
            id=request.delivery_id,
            task_queue=task_queue or Settings().temporal.task_queue,
            result_type=DeliveryTrace,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=_summary(request),
        )
    except WorkflowAlreadyStartedError:
        # Already ran to the end: the repeated call gets the existing delivery, nothing is resent.
        return client.get_workflow_handle(request.delivery_id, result_type=DeliveryTrace)


def _summary(request: ReplyRequest) -> str:
    order = f" · order ref {request.order_ref}" if request.order_ref else ""
    return f"Reply of tenant {request.tenant_id} · {request.channel}{order} · conversation {request.conversation_id}"


async def fetch_trace(client: Client, delivery_id: str) -> DeliveryTrace:
    """The delivery's trace, rebuilt from its workflow history (no worker needed)."""
    handle = client.get_workflow_handle(delivery_id)
    try:
        history = await handle.fetch_history()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise BadInput(f"no delivery with id {delivery_id!r}") from err
        raise
    return await trace_from_history(history, client.data_converter)


def exit_code_for(trace: DeliveryTrace) -> int:
    return EXIT_FAILED if trace.status in ("failed", "cancelled") else EXIT_OK


def format_trace(trace: DeliveryTrace) -> str:
    """The human form: a summary, then one aligned line per event in local time."""
    lines = [
        f"delivery   {trace.delivery_id}",
        f"status     {trace.status}" + (f" via {trace.provider_final}" if trace.provider_final else ""),
        f"tenant     {trace.tenant_id}   channel {trace.channel}   conversation {trace.conversation_id}",
    ]
    for label, value in (("order", trace.order_id), ("note", trace.note),
                         ("sp-api", " ".join(filter(None, [trace.spapi_message_type, trace.spapi_request_id]))),
                         ("message-id", trace.email_message_id)):
        if value:
            lines.append(f"{label:<10} {value}")
    lines.append("")
    for event in trace.events:
        at = event.at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
        attempt = f"#{event.attempt}" if event.attempt else ""
        lines.append(f"{at}  {event.step:<17} {event.outcome:<16} {attempt:<4} {event.detail or ''}".rstrip())
    return "\n".join(lines)


# --- commands --------------------------------------------------------------------------------


def request_from_args(args: argparse.Namespace) -> ReplyRequest:
    if (args.body is None) == (args.body_file is None):
        raise BadInput("give the reply text with exactly one of --body or --body-file")
    body = args.body if args.body is not None else _read_text(args.body_file, "--body-file")
    fields: dict[str, Any] = {
        "delivery_id": args.delivery_id or new_delivery_id(),
        "tenant_id": args.tenant, "conversation_id": args.conversation or args.thread_key or "cli",
        "channel": args.channel, "order_ref": args.order_ref, "thread_key": args.thread_key,
        "marketplace_id": args.marketplace, "to": args.to, "from_address": args.from_address,
        "subject": args.subject, "body_text": body, "in_reply_to": args.in_reply_to,
        "spapi_message_type": args.message_type,
    }
    if args.body_html_file:
        fields["body_html"] = _read_text(args.body_html_file, "--body-html-file")
    try:
        return ReplyRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as err:
        raise BadInput(describe_validation_error(err)) from None


def describe_validation_error(err: ValidationError) -> str:
    problems = []
    for error in err.errors():
        field = str(error["loc"][0]) if error["loc"] else "input"
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{_FLAGS.get(field, field)} ({field}): {message}")
    return "invalid input:\n  " + "\n  ".join(problems)


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{flag}: {path} is not valid UTF-8 text") from None
    except OSError as err:
        raise BadInput(f"{flag}: cannot read {path}: {err.strerror}") from None


async def cmd_send(client: Client, args: argparse.Namespace) -> int:
    request: ReplyRequest = args.request
    handle = await start_delivery(client, request)
    if not args.wait:
        print(json.dumps({"delivery_id": request.delivery_id, "run_id": handle.result_run_id})
              if args.json else f"started delivery {request.delivery_id}")
        return EXIT_OK
    await _wait_closed(handle)
    trace = await fetch_trace(client, request.delivery_id)
    print(trace.model_dump_json(indent=2) if args.json else format_trace(trace))
    return exit_code_for(trace)


async def _wait_closed(handle: WorkflowHandle[Any, Any]) -> None:
    # The result of a cancelled run is an error; the trace is read from the history either way.
    try:
        await handle.result()
    except Exception:
        pass


async def cmd_trace(client: Client, args: argparse.Namespace) -> int:
    trace = await fetch_trace(client, args.delivery_id)
    print(trace.model_dump_json(indent=2) if args.json else format_trace(trace))
    return exit_code_for(trace)


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    clauses = [f"WorkflowType = '{WORKFLOW_TYPE}'"]
    for key, value in ((sa.DELIVERY_STATUS, args.status), (sa.TENANT_ID, args.tenant),
                       (sa.DELIVERY_CHANNEL, args.channel), (sa.AMAZON_ORDER_ID, args.order_id)):
        if value:
            if "'" in value:
                raise BadInput(f"{key.name} filter must not contain quotes")
            clauses.append(f"{key.name} = '{value}'")
    if args.since:  # already checked and made RFC 3339 by run()
        clauses.append(f"StartTime >= '{args.since}'")
    rows = []
    async for execution in client.list_workflows(" AND ".join(clauses), limit=args.limit):
        attrs = execution.typed_search_attributes
        rows.append({  # the same keys as `list --json`
            "delivery_id": execution.id,
            "status": attrs.get(sa.DELIVERY_STATUS),
            "provider": attrs.get(sa.DELIVERY_PROVIDER),
            "channel": attrs.get(sa.DELIVERY_CHANNEL),
            "tenant_id": attrs.get(sa.TENANT_ID),
            "order_id": attrs.get(sa.AMAZON_ORDER_ID),
            "started_at": execution.start_time.isoformat(),
            "workflow_status": execution.status.name if execution.status else None,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{(row['started_at'] or '')[:19]}  {row['delivery_id']:<32} {row['status'] or '-':<16} "
                  f"{row['provider'] or '-':<14} {row['tenant_id'] or '-':<16} {row['order_id'] or ''}")
        print(f"{len(rows)} deliveries")
    return EXIT_OK


def _parse_since(value: str) -> str:
    """An RFC 3339 time for visibility; a date or time without a zone is taken as local time."""
    try:
        since = datetime.fromisoformat(value)
        return (since if since.tzinfo else since.astimezone()).isoformat()
    except ValueError:
        raise BadInput(f"--since: {value!r} is not an ISO date or time (e.g. 2026-12-01 or "
                       "2026-12-01T08:00:00+00:00)") from None


async def cmd_signal(client: Client, args: argparse.Namespace) -> int:
    try:
        action_args = OperatorActionInput(
            order_id=args.arg if args.action == "set_order_id" else None,
            note=args.arg if args.action == "mark_delivered" else None,
            by=args.by, reason=args.reason,
        )
    except ValidationError as err:
        raise BadInput(describe_validation_error(err)) from None
    handle = client.get_workflow_handle(args.delivery_id)
    try:
        result = await handle.execute_update(args.action, action_args, result_type=OperatorActionResult)
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        raise BadInput(cause.message if isinstance(cause, ApplicationError) else str(cause or err)) from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise BadInput(await _why_not_running(client, args.delivery_id, args.action)) from None
        raise
    print(result.model_dump_json(indent=2) if args.json else result.message)
    return EXIT_OK if result.accepted else EXIT_FAILED


async def _why_not_running(client: Client, delivery_id: str, action: str) -> str:
    try:
        description = await client.get_workflow_handle(delivery_id).describe()
    except RPCError:
        return f"no delivery with id {delivery_id!r}"
    status = description.typed_search_attributes.get(sa.DELIVERY_STATUS) or (
        description.status.name.lower() if description.status else "closed")
    return f"{action} refused: delivery {delivery_id} has already ended ({status})"


async def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    handle = client.get_workflow_handle(args.delivery_id)
    try:
        description = await handle.describe()
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise BadInput(f"no delivery with id {args.delivery_id!r}") from None
        raise
    if description.status != WorkflowExecutionStatus.RUNNING:
        raise BadInput(f"delivery {args.delivery_id} has already ended ({description.status.name.lower()})"
                       if description.status else f"delivery {args.delivery_id} is not running")
    await handle.cancel(reason=args.reason or "cancelled from the CLI")
    print(f"cancel requested for {args.delivery_id}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    written = write_schemas(Path(args.out))
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def json_schemas() -> dict[str, dict[str, Any]]:
    from delivery.models import OperatorActionInput as ActionInput

    return {
        "ReplyRequest.json": ReplyRequest.model_json_schema(),
        "DeliveryTrace.json": DeliveryTrace.model_json_schema(mode="serialization"),
        "OperatorActionInput.json": ActionInput.model_json_schema(),
    }


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = out / name
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written


# --- argument parsing ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="starter.py", description="Send, inspect and operate reply deliveries.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    send = sub.add_parser("send", help="start a delivery")
    send.add_argument("--tenant", required=True)
    send.add_argument("--channel", required=True)
    send.add_argument("--to", required=True, help="buyer address or Amazon relay address")
    send.add_argument("--subject", required=True)
    send.add_argument("--body")
    send.add_argument("--body-file")
    send.add_argument("--body-html-file")
    send.add_argument("--order-ref")
    send.add_argument("--thread-key")
    send.add_argument("--conversation")
    send.add_argument("--marketplace")
    send.add_argument("--from", dest="from_address")
    send.add_argument("--in-reply-to")
    send.add_argument("--message-type")
    send.add_argument("--delivery-id")
    send.add_argument("--wait", action="store_true", help="wait for the end and print the trace")
    send.add_argument("--json", action="store_true")

    trace = sub.add_parser("trace", help="print a delivery's trace, rebuilt from its history")
    trace.add_argument("delivery_id")
    trace.add_argument("--json", action="store_true")

    listing = sub.add_parser("list", help="list deliveries (Temporal visibility)")
    listing.add_argument("--status")
    listing.add_argument("--tenant")
    listing.add_argument("--channel")
    listing.add_argument("--order-id")
    listing.add_argument("--since", help="ISO date or time")
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")

    signal = sub.add_parser("signal", help="operator action on a running delivery")
    signal.add_argument("delivery_id")
    signal.add_argument("action", choices=OPERATOR_ACTIONS)
    signal.add_argument("arg", nargs="?", help="ORDER_ID for set_order_id, NOTE for mark_delivered")
    signal.add_argument("--by")
    signal.add_argument("--reason")
    signal.add_argument("--json", action="store_true")

    cancel = sub.add_parser("cancel", help="cancel a running delivery")
    cancel.add_argument("delivery_id")
    cancel.add_argument("--reason")

    schema = sub.add_parser("schema", help="write the JSON Schema of the public contracts")
    schema.add_argument("--out", default=str(SCHEMA_DIR))
    return parser


COMMANDS = {"send": cmd_send, "trace": cmd_trace, "list": cmd_list, "signal": cmd_signal, "cancel": cmd_cancel}


async def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            return cmd_schema(args)
        # Refuse bad input before touching the network.
        if args.command == "send":
            args.request = request_from_args(args)
        if args.command == "list" and args.since:
            args.since = _parse_since(args.since)
        settings = Settings()
        client = await Client.connect(settings.temporal.address, namespace=settings.temporal.namespace,
                                      data_converter=data_converter(settings.codec))
        return await COMMANDS[args.command](client, args)
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def main() -> None:
    code = asyncio.run(run())
    # The Temporal client's native threads can abort a normal interpreter shutdown
    # ("PyGILState_Release", temporalio/sdk-python#300), which would replace our exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
