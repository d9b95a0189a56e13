"""Rebuild a delivery's trace from its workflow history alone (no worker, open or closed workflows).

The history is replayed through the workflow code itself, locally, and the workflow's own trace is read
at the end of the history. So the rebuilt trace is, by construction, what the live `trace` query
answers (same events, same `workflow.now()` times), payloads are decoded by the configured data
converter (and so its codec), and a history the current code cannot replay is reported as such.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    Replayer,
    UnsandboxedWorkflowRunner,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from delivery.models import DeliveryTrace, ReplyRequest

# Replays run unsandboxed (the code is deterministic and does no I/O), so this module-level map is
# shared with the replayed workflow: workflow id -> the workflow instance being replayed.
_instances: dict[str, Any] = {}


class HistoryNotReplayable(Exception):
    """The history does not replay with the current workflow code (or is not a delivery)."""


class _CaptureInstance(WorkflowInboundInterceptor):
    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        _instances[workflow.info().workflow_id] = workflow.instance()
        return await super().execute_workflow(input)


class _CaptureInterceptor(Interceptor):
    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _CaptureInstance


async def trace_from_history(history: WorkflowHistory, converter: DataConverter) -> DeliveryTrace:
    from workflows.reply_delivery import ReplyDeliveryWorkflow

    if not any(event.HasField("workflow_task_completed_event_attributes") for event in history.events):
        # No worker has run the delivery yet: replaying would run its first step ahead of time.
        return await _trace_before_first_task(history, converter)
    key = history.workflow_id
    replayer = Replayer(
        workflows=[ReplyDeliveryWorkflow],
        workflow_runner=UnsandboxedWorkflowRunner(),
        data_converter=converter,
        interceptors=[_CaptureInterceptor()],
    )
    try:
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        instance = _instances.get(key)
        if instance is None or result.replay_failure is not None:
            raise HistoryNotReplayable(
                f"the history of {history.workflow_id} does not replay with this code: "
                f"{result.replay_failure or 'no ReplyDeliveryWorkflow run in it'}")
        trace: DeliveryTrace = instance.trace.model_copy(deep=True)
    finally:
        _instances.pop(key, None)
    return trace



async def _trace_before_first_task(history: WorkflowHistory, converter: DataConverter) -> DeliveryTrace:
    started = history.events[0]
    payloads = started.workflow_execution_started_event_attributes.input.payloads
    [request] = await converter.decode(payloads, [ReplyRequest])
    return DeliveryTrace.begin(request, started.event_time.ToDatetime(tzinfo=UTC))
