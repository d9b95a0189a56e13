"""The failure taxonomy (ARCHITECTURE §4). Errors leave an activity only as these `ApplicationError` types.

- transient: retry with backoff.
- throttled: retry after the provider's delay (`next_retry_delay`); never a fallback, never a failure.
- permanent: no retry; the next provider, if any. `reason` names why (not_eligible, credentials_missing,
  configuration, rejected, ...).
- ambiguous: the request may have been accepted (timeout or dropped connection after it was sent).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

TRANSIENT: Final = "transient"
THROTTLED: Final = "throttled"
PERMANENT: Final = "permanent"
AMBIGUOUS: Final = "ambiguous"
FAILURE_TYPES: Final = (TRANSIENT, THROTTLED, PERMANENT, AMBIGUOUS)


def _details(reason: str | None, request_id: str | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if reason:
        details["reason"] = reason
    if request_id:
        details["request_id"] = request_id
    if extra:
        details.update(extra)
    return details


def transient(message: str, *, request_id: str | None = None, **extra: Any) -> ApplicationError:
    return ApplicationError(message, _details(None, request_id, extra), type=TRANSIENT)


def throttled(message: str, delay: timedelta, *, request_id: str | None = None, **extra: Any) -> ApplicationError:
    extra["retry_after_s"] = delay.total_seconds()
    return ApplicationError(
        message, _details(None, request_id, extra), type=THROTTLED, next_retry_delay=delay,
        category=ApplicationErrorCategory.BENIGN,
    )


def permanent(message: str, reason: str, *, request_id: str | None = None, **extra: Any) -> ApplicationError:
    return ApplicationError(message, _details(reason, request_id, extra), type=PERMANENT, non_retryable=True)


def ambiguous(message: str, *, request_id: str | None = None, **extra: Any) -> ApplicationError:
    return ApplicationError(message, _details(None, request_id, extra), type=AMBIGUOUS, non_retryable=True)


def failure_details(error: BaseException) -> dict[str, Any]:
    """The details dict of a taxonomy error (empty for anything else)."""
    if isinstance(error, ApplicationError) and error.details and isinstance(error.details[0], dict):
        return dict(error.details[0])
    return {}
