"""Retry policies and timeouts, one per activity, in one place.

Provider steps (credentials, SP-API, SMTP) run one attempt per activity execution and the workflow
drives the retries with these policies, so that every attempt is its own event in the history (the
history is the trace) and an operator action can cut a backoff short. `persist_trace` retries inside
Temporal: it is idempotent and must simply get through eventually.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio.common import RetryPolicy


@dataclass(frozen=True)
class StepPolicy:
    """How one provider step runs: the timeout of a single attempt, and the retry schedule."""

    attempt_timeout: timedelta
    retry: RetryPolicy
    # What an attempt that timed out (the worker died or hung mid-call) means for this step.
    timeout_means: str = "transient"

    def backoff(self, attempt: int) -> timedelta:
        """The wait after failed attempt number `attempt` (1-based), as Temporal computes it."""
        initial = self.retry.initial_interval.total_seconds()
        maximum = (self.retry.maximum_interval or self.retry.initial_interval * 100).total_seconds()
        return timedelta(seconds=min(initial * self.retry.backoff_coefficient ** (attempt - 1), maximum))


# A single attempt per activity execution: the workflow loops (see module docstring).
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)

RESOLVE_ORDER_ID_TIMEOUT = timedelta(seconds=5)
RESOLVE_ORDER_ID = RetryPolicy(maximum_attempts=3)

FETCH_CREDENTIALS = StepPolicy(
    attempt_timeout=timedelta(seconds=30),
    # Vault sealed or down: keep trying for about 10 minutes, then ask an operator.
    retry=RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                      maximum_interval=timedelta(minutes=2), maximum_attempts=8),
)

SPAPI_SEND = StepPolicy(
    attempt_timeout=timedelta(seconds=60),
    # Transient SP-API errors: about 5 minutes of retries, then the SMTP fallback.
    retry=RetryPolicy(initial_interval=timedelta(seconds=5), backoff_coefficient=2.0,
                      maximum_interval=timedelta(minutes=2), maximum_attempts=5),
    # A POST may have reached Amazon before the worker died: never resend blindly.
    timeout_means="ambiguous",
)

SMTP_SEND = StepPolicy(
    attempt_timeout=timedelta(seconds=120),
    # A relay's 4xx greylisting or outage: about an hour of retries, then ask an operator.
    retry=RetryPolicy(initial_interval=timedelta(seconds=10), backoff_coefficient=2.0,
                      maximum_interval=timedelta(minutes=15), maximum_attempts=8),
)

# 429s do not use up attempts (a throttled request was not processed), but a step that is throttled
# this many times in a row is treated as failing.
MAX_THROTTLED_RETRIES = 100
DEFAULT_THROTTLE_DELAY = timedelta(seconds=1)

PERSIST_TRACE_TIMEOUT = timedelta(seconds=30)
PERSIST_TRACE = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                            maximum_interval=timedelta(seconds=30), maximum_attempts=0)

AWAITING_ACTION_TIMEOUT = timedelta(hours=72)
