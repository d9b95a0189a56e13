#!/bin/sh
# One-shot job (admin-tools image, or anywhere the `temporal` CLI is): waits for the Temporal frontend,
# creates the namespace if it is missing and registers the delivery search attributes (ARCHITECTURE §4).
# Safe to run again: an existing namespace, or an attribute that already exists as Keyword, is success;
# an attribute that exists with another type is an error (queries on it would not work).
set -eu

: "${TEMPORAL_ADDRESS:?TEMPORAL_ADDRESS (host:port of the frontend) is required}"
NAMESPACE="${TEMPORAL_NAMESPACE:-default}"
RETENTION="${TEMPORAL_NAMESPACE_RETENTION:-30d}"
ATTEMPTS="${TEMPORAL_SETUP_ATTEMPTS:-60}"
ATTRIBUTE_ATTEMPTS="${TEMPORAL_SETUP_ATTRIBUTE_ATTEMPTS:-10}"
SEARCH_ATTRIBUTES="DeliveryStatus DeliveryProvider DeliveryChannel TenantId AmazonOrderId"

echo "waiting for Temporal at $TEMPORAL_ADDRESS"
attempt=1
until temporal operator cluster health >/dev/null 2>&1; do
    if [ "$attempt" -ge "$ATTEMPTS" ]; then
        echo "Temporal at $TEMPORAL_ADDRESS was not healthy after $ATTEMPTS attempts" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 2
done

if temporal operator namespace describe --namespace "$NAMESPACE" >/dev/null 2>&1; then
    echo "namespace $NAMESPACE already exists"
else
    # A concurrent run may create it between describe and create: check again before failing.
    temporal operator namespace create --namespace "$NAMESPACE" --retention "$RETENTION" \
        || temporal operator namespace describe --namespace "$NAMESPACE" >/dev/null
    echo "namespace $NAMESPACE created (retention $RETENTION)"
fi

# A new namespace may take a moment to be visible to every frontend: retry each attribute briefly.
for name in $SEARCH_ATTRIBUTES; do
    attempt=1
    while ! output=$(temporal operator search-attribute create --namespace "$NAMESPACE" --name "$name" \
            --type Keyword 2>&1); do
        if temporal operator search-attribute list --namespace "$NAMESPACE" 2>/dev/null \
                | grep -Eq "^[[:space:]]*$name[[:space:]]+Keyword[[:space:]]*$"; then
            break  # already there as Keyword (older CLIs call that an error)
        fi
        if [ "$attempt" -ge "$ATTRIBUTE_ATTEMPTS" ]; then
            printf '%s\n' "$output" >&2
            echo "could not register search attribute $name as Keyword in namespace $NAMESPACE" >&2
            exit 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
    echo "search attribute $name: Keyword"
done
echo "Temporal namespace $NAMESPACE is ready for the delivery worker"
