"""Search attributes for ops in the Web UI and `temporal workflow list --query` (ARCHITECTURE §4)."""

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

DELIVERY_STATUS = SearchAttributeKey.for_keyword("DeliveryStatus")
DELIVERY_PROVIDER = SearchAttributeKey.for_keyword("DeliveryProvider")
DELIVERY_CHANNEL = SearchAttributeKey.for_keyword("DeliveryChannel")
TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
AMAZON_ORDER_ID = SearchAttributeKey.for_keyword("AmazonOrderId")

ALL = (DELIVERY_STATUS, DELIVERY_PROVIDER, DELIVERY_CHANNEL, TENANT_ID, AMAZON_ORDER_ID)


async def ensure_registered(client: Client, namespace: str) -> list[str]:
    """Register the custom attributes if missing (idempotent: "already exists" is success).

    The dev server gets them by flag too; a self-hosted cluster or the time-skipping test server only
    this way. Returns the names that were added.
    """
    try:
        listing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace))
        existing = set(listing.custom_attributes)
    except RPCError as err:
        if err.status != RPCStatusCode.UNIMPLEMENTED:  # the time-skipping test server cannot list
            raise
        existing = set()
    missing = {key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for key in ALL if key.name not in existing}
    if not missing:
        return []
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=namespace, search_attributes=missing))
    except RPCError as err:
        if err.status != RPCStatusCode.ALREADY_EXISTS:
            raise
        return []
    return sorted(missing)
