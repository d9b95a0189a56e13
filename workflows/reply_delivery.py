"""ReplyDeliveryWorkflow: one reply, delivered by SP-API or SMTP, traced step by step.

Read `run` top to bottom: it is the decision flow of ARCHITECTURE §2. The helpers below it run one
provider step with retries (each attempt its own activity, so each is in the history), wait for
operators, and keep the trace, the search attributes and the delivery_trace row up to date.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

with workflow.unsafe.imports_passed_through():
    # pydantic imports email_validator on the first EmailStr validation: load it here, passed through,
    # rather than lazily inside the sandbox.
    import email_validator  # noqa: F401

    from activities.orders import resolve_order_id
    from delivery import failures
    from delivery import search_attributes as sa
    from delivery.models import (
        CredentialsRef,
        CredentialsRequest,
        DeliveryStatus,
        DeliveryTrace,
        OperatorActionInput,
        OperatorActionResult,
        OrderLookup,
        PersistTraceInput,
        ProviderFinal,
        ReplyRequest,
        SmtpSendInput,
        SmtpSendResult,
        SpapiSendInput,
        SpapiSendResult,
        TraceEvent,
    )
    from workflows import policies
    from workflows.policies import StepPolicy

T = TypeVar("T")

NO_ORDER_ID_NOTE = "No orderId - SMTP fallback used"

# Workflows started before this patch let an attempt in flight run to its end when an operator acted;
# newer ones cancel it (see _attempt_unless_action). The id stays as long as such histories may replay.
CUT_ATTEMPTS_PATCH = "operator-action-cancels-attempt-in-flight"


@dataclass
class _Action:
    name: str
    args: OperatorActionInput
    outcome: str | None = None  # set when the flow has taken the action up


class _ActionArrived(Exception):
    """An operator action is waiting: leave the current step and let `run` apply it."""


class _StepFailed(Exception):
    """A provider step ended without success: `kind` is permanent, ambiguous or exhausted."""

    def __init__(self, kind: str, message: str, attempts: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.attempts = attempts


# Input that fails validation (another language's caller sent bad JSON) fails the workflow with the
# field named, instead of retrying the workflow task forever.
@workflow.defn(name="ReplyDeliveryWorkflow", failure_exception_types=[ValidationError])
class ReplyDeliveryWorkflow:
    @workflow.init
    def __init__(self, request: ReplyRequest) -> None:
        self.request = request
        self.trace = DeliveryTrace.begin(request, workflow.now())
        self.route = self.trace.provider_initial  # "spapi" or "smtp": the provider step to run next
        self.fallback = False  # SMTP is a fallback from SP-API
        self.credentials: CredentialsRef | None = None
        self.order_resolved = False
        self.actions: list[_Action] = []
        self.sequence = 0
        self.persists: list[Awaitable[Any]] = []
        self.clock: datetime | None = None  # when set, the time of the events being recorded
        self.cut_attempts = False  # an operator action cancels the attempt in flight (CUT_ATTEMPTS_PATCH)

    @workflow.run
    async def run(self, request: ReplyRequest) -> DeliveryTrace:
        # Asked first thing, so the patch marker is always the first command of a new history.
        self.cut_attempts = workflow.patched(CUT_ATTEMPTS_PATCH)
        self._set_status("delivering")
        try:
            while not self.trace.is_final:
                try:
                    if self.route == "spapi":
                        await self.try_spapi()
                    else:
                        await self.send_smtp()
                except _ActionArrived:
                    self._apply_next_action()
        except asyncio.CancelledError:
            reason = workflow.cancellation_reason() or "no reason given"
            self._finish("cancelled", None, f"Cancelled by operator: {reason}")
            self._drop_unapplied_actions()
            await self._persist_final()
            raise  # the workflow must end CANCELED, not completed
        self._drop_unapplied_actions()
        await self._persist_final()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.trace

    # --- the two provider routes --------------------------------------------------------------

    async def try_spapi(self) -> None:
        """SP-API when an order id and credentials are there; otherwise fall back to SMTP, saying why."""
        if not self.order_resolved:
            await self._resolve_order_id()
        if self.trace.order_id is None:
            return self._fall_back(NO_ORDER_ID_NOTE)

        if self.credentials is None:
            try:
                self.credentials = await self._attempts("fetch_credentials", policies.FETCH_CREDENTIALS,
                                                        self._fetch_credentials)
            except _StepFailed as failed:
                if failed.kind == "permanent":
                    return self._fall_back(f"Amazon credentials unavailable ({failed.message}) - SMTP fallback used")
                return await self._await_operator(f"Vault unreachable after {failed.attempts} attempts: "
                                                  f"{failed.message}")
            if self.credentials.served_from_cache_during_outage:
                self._event("fetch_credentials", "cache", detail="Vault unavailable: cached credentials used")

        try:
            result = await self._attempts("spapi_send", policies.SPAPI_SEND, self._spapi_send)
        except _StepFailed as failed:
            if failed.kind == "ambiguous":
                return await self._await_operator(f"SP-API outcome unknown ({failed.message}) - no automatic SMTP send")
            if failed.kind == "permanent":
                return self._fall_back(f"SP-API refused ({failed.message}) - SMTP fallback used")
            return self._fall_back(f"SP-API failed after {failed.attempts} attempts ({failed.message}) - "
                                   "SMTP fallback used")
        self.trace.spapi_message_type = result.message_type
        self.trace.spapi_request_id = result.request_id
        self._finish("delivered", "SPAPI", self.trace.note)

    async def send_smtp(self) -> None:
        """SMTP to the buyer (or, as a fallback, to the Amazon relay address)."""
        try:
            result = await self._attempts("smtp_send", policies.SMTP_SEND, self._smtp_send)
        except _StepFailed as failed:
            if failed.kind == "permanent":
                return self._finish("failed", None, self._with_note(f"SMTP failed: {failed.message}"))
            return await self._await_operator(f"SMTP failed after {failed.attempts} attempts: {failed.message}")
        self.trace.email_message_id = result.message_id
        self._finish("delivered", "SMTP_FALLBACK" if self.fallback else "SMTP", self.trace.note)

    # --- one attempt of each step ---------------------------------------------------------------

    async def _resolve_order_id(self) -> None:
        # workflow.now() right after a local activity differs between the live run and a replay (the
        # marker does not move the replayed clock), so the events recorded until the next server
        # round trip carry the time taken before it.
        self.clock = workflow.now()
        self.trace.order_id = await workflow.execute_local_activity(
            resolve_order_id,
            OrderLookup(order_ref=self.request.order_ref, thread_key=self.request.thread_key,
                        subject=self.request.subject),
            start_to_close_timeout=policies.RESOLVE_ORDER_ID_TIMEOUT,
            retry_policy=policies.RESOLVE_ORDER_ID,
        )
        self.order_resolved = True
        self._event("resolve_order_id", "found" if self.trace.order_id else "not_found", detail=self.trace.order_id)
        self._upsert_search_attributes()

    async def _fetch_credentials(self, attempt: int) -> CredentialsRef:
        return await workflow.execute_activity(
            "fetch_credentials",
            CredentialsRequest(tenant_id=self.request.tenant_id, marketplace_id=self.request.marketplace_id),
            result_type=CredentialsRef,
            start_to_close_timeout=policies.FETCH_CREDENTIALS.attempt_timeout,
            retry_policy=policies.ONE_ATTEMPT,
            summary=f"Vault: SP-API credentials of {self.request.tenant_id} (attempt {attempt})",
        )

    async def _spapi_send(self, attempt: int) -> SpapiSendResult:
        assert self.credentials is not None and self.trace.order_id is not None
        return await workflow.execute_activity(
            "spapi_send",
            SpapiSendInput(
                delivery_id=self.request.delivery_id,
                credentials=self.credentials,
                order_id=self.trace.order_id,
                marketplace_id=self.request.marketplace_id or self.credentials.marketplace_id,
                text=self.request.body_text,
                message_type=self.request.spapi_message_type,
                attempt=attempt,
            ),
            result_type=SpapiSendResult,
            start_to_close_timeout=policies.SPAPI_SEND.attempt_timeout,
            heartbeat_timeout=policies.SPAPI_SEND.attempt_timeout / 2,
            retry_policy=policies.ONE_ATTEMPT,
            cancellation_type=self._send_cancellation(),
            summary=f"SP-API message for order {self.trace.order_id} (attempt {attempt})",
        )

    async def _smtp_send(self, attempt: int) -> SmtpSendResult:
        return await workflow.execute_activity(
            "smtp_send",
            SmtpSendInput(
                delivery_id=self.request.delivery_id,
                tenant_id=self.request.tenant_id,
                to=self.request.to,
                from_address=self.request.from_address,
                subject=self.request.subject,
                body_text=self.request.body_text,
                body_html=self.request.body_html,
                in_reply_to=self.request.in_reply_to,
                fallback=self.fallback,
                attempt=attempt,
            ),
            result_type=SmtpSendResult,
            start_to_close_timeout=policies.SMTP_SEND.attempt_timeout,
            heartbeat_timeout=policies.SMTP_SEND.attempt_timeout / 2,
            retry_policy=policies.ONE_ATTEMPT,
            cancellation_type=self._send_cancellation(),
            summary=f"SMTP to {'Amazon relay' if self.fallback else 'buyer'} (attempt {attempt})",
        )

    # --- retries, operators, bookkeeping ------------------------------------------------------

    async def _attempts(self, step: str, policy: StepPolicy, attempt_once: Callable[[int], Awaitable[T]]) -> T:
        """Run `attempt_once` until it succeeds, backing off per `policy`; raise _StepFailed otherwise.

        429s do not use up attempts. An operator action cuts a backoff short (_ActionArrived).
        """
        attempt = 0
        throttled_in_a_row = 0
        max_attempts = policy.retry.maximum_attempts
        while True:
            self._raise_if_action_waiting()
            attempt += 1
            self.clock = None
            try:
                if self.cut_attempts:
                    result = await self._attempt_unless_action(step, policy, attempt, attempt_once)
                else:
                    result = await attempt_once(attempt)
            except ActivityError as err:
                if is_cancelled_exception(err):
                    raise
                kind, message, details = self._classify(err, policy)
                request_id = details.get("request_id")
                detail = f"{message} (request {request_id})" if request_id and request_id not in message else message
                if kind in ("permanent", "ambiguous"):
                    self._event(step, kind, attempt, detail)
                    raise _StepFailed(kind, message, attempt) from None
                if kind == "throttled" and throttled_in_a_row < policies.MAX_THROTTLED_RETRIES:
                    throttled_in_a_row += 1
                    delay = self._throttle_delay(err, details)
                    self._event(step, "throttled", attempt, f"{detail}; retry in {_seconds(delay)}")
                    attempt -= 1
                elif max_attempts and attempt >= max_attempts:
                    self._event(step, "failed", attempt, f"{detail}; no attempts left")
                    raise _StepFailed("exhausted", message, attempt) from None
                else:
                    throttled_in_a_row = 0
                    delay = policy.backoff(attempt)
                    self._event(step, "failed", attempt, f"{detail}; retry in {_seconds(delay)}")
                await self._pause(delay)
                continue
            self._event(step, "ok", attempt, self._describe(result))
            return result

    async def _attempt_unless_action(self, step: str, policy: StepPolicy, attempt: int,
                                     attempt_once: Callable[[int], Awaitable[T]]) -> T:
        """One attempt, raced against operator actions: an action that arrives cancels the attempt.

        A send is awaited until its cancel is acknowledged (WAIT_CANCELLATION_COMPLETED), so the trace
        says how it ended: it finished anyway (the action then finds the delivery done), it stopped
        before anything went out, or it was cut mid-send (ambiguous: the message may be out).
        """
        running = asyncio.ensure_future(attempt_once(attempt))
        acted = asyncio.ensure_future(workflow.wait_condition(lambda: self._next_action() is not None))
        try:
            await workflow.wait([running, acted], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the delivery is cancelled: request the attempt's cancel, go on
            running.cancel()
            acted.cancel()
            raise
        if running.done():
            acted.cancel()
            return running.result()
        running.cancel()
        await workflow.wait([running])
        action = self._next_action()
        why = f"stopped for operator action {action.name if action else 'that arrived'}"
        try:
            return running.result()  # it finished before the cancel reached it
        except ActivityError as err:
            if is_cancelled_exception(err):
                self._event(step, "cancelled", attempt, why)
            else:
                kind, message, _ = self._classify(err, policy)
                # No retry follows, so the attempt's own verdict is what the trace needs: an SMTP
                # "ambiguous" (retried as transient elsewhere) stays ambiguous here.
                if isinstance(err.cause, ApplicationError) and err.cause.type == failures.AMBIGUOUS:
                    kind = failures.AMBIGUOUS
                self._event(step, "failed" if kind in (failures.TRANSIENT, failures.THROTTLED) else kind,
                            attempt, f"{message}; {why}")
        raise _ActionArrived

    def _send_cancellation(self) -> workflow.ActivityCancellationType:
        # A send cancelled for an operator action is awaited, to learn whether it went out.
        return (workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED if self.cut_attempts
                else workflow.ActivityCancellationType.TRY_CANCEL)

    @staticmethod
    def _classify(err: ActivityError, policy: StepPolicy) -> tuple[str, str, dict[str, Any]]:
        cause = err.cause
        if isinstance(cause, ApplicationError):
            kind = cause.type if cause.type in failures.FAILURE_TYPES else "transient"
            # SMTP is at-least-once with a stable Message-ID: an unknown outcome is retried there.
            if kind == "ambiguous" and policy.timeout_means != "ambiguous":
                kind = "transient"
            return kind, cause.message, failures.failure_details(cause)
        if isinstance(cause, ActivityTimeoutError):
            return policy.timeout_means, f"attempt timed out ({cause.type.name if cause.type else 'timeout'})", {}
        return "transient", str(cause or err), {}

    @staticmethod
    def _throttle_delay(err: ActivityError, details: dict[str, Any]) -> timedelta:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.next_retry_delay:
            return cause.next_retry_delay
        if "retry_after_s" in details:
            return timedelta(seconds=float(details["retry_after_s"]))
        return policies.DEFAULT_THROTTLE_DELAY

    @staticmethod
    def _describe(result: Any) -> str | None:
        if isinstance(result, SpapiSendResult):
            return f"{result.message_type} accepted (request {result.request_id})"
        if isinstance(result, SmtpSendResult):
            return f"{result.message_id}: {result.server_reply}"
        if isinstance(result, CredentialsRef):
            return (f"seller {result.seller_id}, marketplace {result.marketplace_id}, region {result.region}, "
                    f"versions app={result.app_version} tenant={result.tenant_version}")
        return None

    async def _pause(self, delay: timedelta) -> None:
        """A backoff that an operator action ends early."""
        self.clock = None
        try:
            await workflow.wait_condition(lambda: self._next_action() is not None, timeout=delay,
                                          timeout_summary="retry backoff")
        except TimeoutError:
            return
        raise _ActionArrived

    async def _await_operator(self, reason: str) -> None:
        """Park the delivery until an operator acts, or fail it when nobody does in time."""
        self._set_status("awaiting_action", reason)
        self.clock = None
        hours = self.request.awaiting_action_hours
        timeout = timedelta(hours=hours) if hours else policies.AWAITING_ACTION_TIMEOUT
        try:
            await workflow.wait_condition(lambda: self._next_action() is not None, timeout=timeout,
                                          timeout_summary="waiting for an operator")
        except TimeoutError:
            self._finish("failed", None, f"No operator action within {_seconds(timeout)}: {reason}")
            return
        raise _ActionArrived

    def _fall_back(self, note: str) -> None:
        self._event("delivery", "fallback", detail=note)
        self.trace.note = note
        self.fallback = True
        self.route = "smtp"
        self._upsert_search_attributes()

    def _with_note(self, text: str) -> str:
        return f"{self.trace.note}; {text}" if self.trace.note else text

    # --- operator actions: Updates with validators, and Signals of the same names ---------------

    @workflow.update(name="retry")
    async def retry_update(self, args: OperatorActionInput) -> OperatorActionResult:
        return await self._accept("retry", args)

    @retry_update.validator
    def _validate_retry(self, args: OperatorActionInput) -> None:
        self._validate("retry", args)

    @workflow.update(name="force_smtp")
    async def force_smtp_update(self, args: OperatorActionInput) -> OperatorActionResult:
        return await self._accept("force_smtp", args)

    @force_smtp_update.validator
    def _validate_force_smtp(self, args: OperatorActionInput) -> None:
        self._validate("force_smtp", args)

    @workflow.update(name="set_order_id")
    async def set_order_id_update(self, args: OperatorActionInput) -> OperatorActionResult:
        return await self._accept("set_order_id", args)

    @set_order_id_update.validator
    def _validate_set_order_id(self, args: OperatorActionInput) -> None:
        self._validate("set_order_id", args)

    @workflow.update(name="mark_delivered")
    async def mark_delivered_update(self, args: OperatorActionInput) -> OperatorActionResult:
        return await self._accept("mark_delivered", args)

    @mark_delivered_update.validator
    def _validate_mark_delivered(self, args: OperatorActionInput) -> None:
        self._validate("mark_delivered", args)

    @workflow.signal(name="retry")
    def retry_signal(self, args: OperatorActionInput) -> None:
        self._enqueue_signal("retry", args)

    @workflow.signal(name="force_smtp")
    def force_smtp_signal(self, args: OperatorActionInput) -> None:
        self._enqueue_signal("force_smtp", args)

    @workflow.signal(name="set_order_id")
    def set_order_id_signal(self, args: OperatorActionInput) -> None:
        self._enqueue_signal("set_order_id", args)

    @workflow.signal(name="mark_delivered")
    def mark_delivered_signal(self, args: OperatorActionInput) -> None:
        self._enqueue_signal("mark_delivered", args)

    @workflow.query(name="trace")
    def trace_query(self) -> DeliveryTrace:
        return self.trace

    def _validate(self, name: str, args: OperatorActionInput) -> None:
        """Refuse what makes no sense; a refused update writes nothing to the history."""
        if self.trace.is_final:
            raise ApplicationError(f"{name} refused: delivery {self.trace.delivery_id} is already "
                                   f"{self.trace.status}", type="action_refused", non_retryable=True)
        if name == "set_order_id":
            if self.request.channel != "amazon":
                raise ApplicationError(f"set_order_id refused: channel {self.request.channel} does not use "
                                       "Amazon orders", type="action_refused", non_retryable=True)
            if not args.order_id:
                raise ApplicationError("set_order_id needs an order id in 3-7-7 digits, e.g. 123-1234567-1234567",
                                       type="action_refused", non_retryable=True)
        # Only in workflows of the patch's time: a signal is validated again on replay, and older
        # histories may hold a force_smtp that was applied then.
        if name == "force_smtp" and self.route == "smtp" and self.cut_attempts:
            raise ApplicationError(f"force_smtp refused: delivery {self.trace.delivery_id} already goes by SMTP; "
                                   "`retry` sends again now", type="action_refused", non_retryable=True)
        if name == "mark_delivered" and not (args.note and args.note.strip()):
            raise ApplicationError("mark_delivered needs a note saying how the reply reached the buyer",
                                   type="action_refused", non_retryable=True)

    async def _accept(self, name: str, args: OperatorActionInput) -> OperatorActionResult:
        action = _Action(name, args)
        self.actions.append(action)
        await workflow.wait_condition(lambda: action.outcome is not None)
        return OperatorActionResult(accepted=action.outcome == "applied", status=self.trace.status,
                                    message=f"{name}: {action.outcome}; delivery is {self.trace.status}")

    def _enqueue_signal(self, name: str, args: OperatorActionInput) -> None:
        try:
            self._validate(name, args)
        except ApplicationError as refused:
            # The signal itself is in the history; the trace of a finished delivery stays as persisted.
            workflow.logger.warning("signal %s ignored: %s", name, refused.message)
            return
        self.actions.append(_Action(name, args))

    def _next_action(self) -> _Action | None:
        return next((a for a in self.actions if a.outcome is None), None)

    def _raise_if_action_waiting(self) -> None:
        if self._next_action() is not None:
            raise _ActionArrived

    def _apply_next_action(self) -> None:
        action = self._next_action()
        if action is None:
            return
        args = action.args
        who = f" by {args.by}" if args.by else ""
        why = f" ({args.reason})" if args.reason else ""
        if action.name == "retry":
            detail = f"retry {self.route}{who}{why}"
        elif action.name == "force_smtp":
            self.fallback = self.fallback or self.trace.provider_initial == "spapi"
            self.route = "smtp"
            self.trace.note = self._with_note(f"SMTP forced by operator{who}")
            detail = f"force_smtp{who}{why}"
        elif action.name == "set_order_id":
            self.trace.order_id = args.order_id
            self.order_resolved = True
            self.route = "spapi"
            self.fallback = False
            detail = f"set_order_id {args.order_id}{who}{why}"
        else:  # mark_delivered
            provider: ProviderFinal = ("SPAPI" if self.route == "spapi"
                                       else "SMTP_FALLBACK" if self.fallback else "SMTP")
            detail = f"mark_delivered{who}{why}: {args.note}"
            self._event("operator", "mark_delivered", detail=detail)
            action.outcome = "applied"
            return self._finish("delivered", provider, self._with_note(f"Marked delivered{who}: {args.note}"))
        self._event("operator", action.name, detail=detail)
        action.outcome = "applied"
        self._set_status("delivering")

    def _drop_unapplied_actions(self) -> None:
        for action in self.actions:
            if action.outcome is None:
                action.outcome = f"not applied, the delivery ended {self.trace.status} first"
                self._event("operator", "not_applied", detail=f"{action.name}: delivery already {self.trace.status}")

    def _event(self, step: str, outcome: str, attempt: int | None = None, detail: str | None = None) -> None:
        at = self.clock or workflow.now()
        self.trace.events.append(TraceEvent(at=at, step=step, outcome=outcome, attempt=attempt, detail=detail))

    def _set_status(self, status: DeliveryStatus, note: str | None = None) -> None:
        if note is not None:
            self.trace.note = note
        if self.trace.status != status:
            self.trace.status = status
            self._event("delivery", status, detail=note)
            self._upsert_search_attributes()
            if status in ("delivering", "awaiting_action"):
                self._start_persist()

    def _finish(self, status: DeliveryStatus, provider: ProviderFinal | None, note: str | None) -> None:
        self.trace.provider_final = provider
        self.trace.note = note
        self.trace.status = status
        self._event("delivery", status, detail=note if status != "delivered" else provider)
        self._upsert_search_attributes()

    def _upsert_search_attributes(self) -> None:
        provider = self.trace.provider_final or ("SPAPI" if self.route == "spapi" else
                                                 "SMTP_FALLBACK" if self.fallback else "SMTP")
        updates = [
            sa.DELIVERY_STATUS.value_set(self.trace.status),
            sa.DELIVERY_PROVIDER.value_set(provider),
            sa.DELIVERY_CHANNEL.value_set(self.request.channel),
            sa.TENANT_ID.value_set(self.request.tenant_id),
        ]
        if self.trace.order_id:
            updates.append(sa.AMAZON_ORDER_ID.value_set(self.trace.order_id))
        workflow.upsert_search_attributes(updates)

    def _start_persist(self) -> Awaitable[Any]:
        """Write the trace row in the background: a slow or down trace store never holds up a delivery."""
        # Ordered by workflow time, then by write within one workflow task: unlike a plain counter it
        # keeps growing in the new run after `temporal workflow reset`, so the row follows the new run.
        self.sequence += 1
        sequence = int(workflow.now().timestamp() * 1_000_000) * 1000 + self.sequence % 1000
        handle = workflow.start_activity(
            "persist_trace",
            PersistTraceInput(trace=self.trace.model_copy(deep=True), sequence=sequence),
            start_to_close_timeout=policies.PERSIST_TRACE_TIMEOUT,
            retry_policy=policies.PERSIST_TRACE,
            summary=f"delivery_trace row: {self.trace.status}",
        )
        self.persists.append(handle)
        return handle

    async def _persist_final(self) -> None:
        """The final write, awaited (and every earlier one), so the row ends in the final state."""
        self._start_persist()
        writes = asyncio.gather(*self.persists, return_exceptions=True)
        try:
            # Shielded: a cancel that arrives while the trace store is down must not cancel the writes,
            # or the row would never show how the delivery ended.
            await asyncio.shield(writes)
        except asyncio.CancelledError:
            await writes
            raise


def _seconds(delay: timedelta) -> str:
    total = delay.total_seconds()
    if total >= 3600:
        return f"{total / 3600:g}h"
    if total >= 60:
        return f"{total / 60:g}min"
    return f"{total:g}s"
