"""`resolve_order_id`: find the Amazon order id in what the help-desk knows about the conversation.

Pure and fast, so the workflow runs it as a local activity.
"""

from __future__ import annotations

import re

from temporalio import activity

from delivery.models import ORDER_ID_PATTERN, OrderLookup

# Not part of a longer digit run: "1234-1234567-1234567" holds no order id.
_ORDER_ID_IN_TEXT = re.compile(rf"(?<![\d-]){ORDER_ID_PATTERN}(?![\d-])")


def find_order_id(*candidates: str | None) -> str | None:
    """The first 3-7-7 order id found in the candidates, in the order given."""
    for text in candidates:
        if text:
            match = _ORDER_ID_IN_TEXT.search(text)
            if match:
                return match.group(0)
    return None


@activity.defn
async def resolve_order_id(lookup: OrderLookup) -> str | None:
    """Order ref first, then the thread key, then the subject (ARCHITECTURE §1)."""
    return find_order_id(lookup.order_ref, lookup.thread_key, lookup.subject)
