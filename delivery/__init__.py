"""What the workflow, the activities, the worker and the starter share: contracts, settings, failures."""

TASK_QUEUE = "reply-delivery"
WORKFLOW_TYPE = "ReplyDeliveryWorkflow"
