#!/bin/sh
# One-shot job (admin-tools image): creates Temporal's two PostgreSQL databases and brings their
# schemas to the version this server release needs. Safe to run again: an existing database is kept,
# `setup-schema -v 0.0` is a no-op on a schema already past 0.0 and `update-schema` applies only what
# is missing. Run by `docker compose up` before the server starts (service temporal-schema).
set -eu

: "${POSTGRES_SEEDS:?POSTGRES_SEEDS (the PostgreSQL host) is required}"
: "${POSTGRES_USER:?POSTGRES_USER is required}"
: "${SQL_PASSWORD:?SQL_PASSWORD (the PostgreSQL password) is required}"
DB_PORT="${DB_PORT:-5432}"
SCHEMA_ROOT=/etc/temporal/schema/postgresql/v12

sql_tool() {
    temporal-sql-tool --plugin postgres12 --ep "$POSTGRES_SEEDS" -p "$DB_PORT" -u "$POSTGRES_USER" "$@"
}

echo "waiting for PostgreSQL at $POSTGRES_SEEDS:$DB_PORT"
attempt=1
until nc -z -w 5 "$POSTGRES_SEEDS" "$DB_PORT"; do
    if [ "$attempt" -ge 30 ]; then
        echo "PostgreSQL did not answer on $POSTGRES_SEEDS:$DB_PORT" >&2
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 2
done

for db in temporal temporal_visibility; do
    case "$db" in
        temporal) dir="$SCHEMA_ROOT/temporal/versioned" ;;
        *) dir="$SCHEMA_ROOT/visibility/versioned" ;;
    esac
    if output=$(sql_tool --db "$db" create 2>&1); then
        echo "database $db created"
    elif printf '%s' "$output" | grep -q "already exists"; then
        echo "database $db already exists"
    else
        printf '%s\n' "$output" >&2
        echo "could not create database $db" >&2
        exit 1
    fi
    sql_tool --db "$db" setup-schema -v 0.0
    sql_tool --db "$db" update-schema -d "$dir"
    echo "database $db: schema up to date"
done
