"""`persist_trace`: the delivery_trace table, a projection of the workflow history for the help-desk.

One row per delivery, upserted by delivery id and guarded by a per-delivery sequence, so a late retry
of an older write never overwrites a newer state. SQLite by default, any SQLAlchemy async URL by setting.
"""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    event,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.schema import CreateIndex, CreateTable
from temporalio import activity

from delivery import failures
from delivery.models import DeliveryTrace, PersistTraceInput

log = logging.getLogger(__name__)

metadata = MetaData()

delivery_trace = Table(
    "delivery_trace",
    metadata,
    Column("delivery_id", String(128), primary_key=True),
    Column("tenant_id", String(63), nullable=False, index=True),
    Column("conversation_id", String(256), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("provider_initial", String(8), nullable=False),
    Column("provider_final", String(16)),
    Column("status", String(16), nullable=False, index=True),
    Column("note", Text),
    Column("order_id", String(32)),
    Column("spapi_message_type", String(64)),
    Column("spapi_request_id", String(128)),
    Column("email_message_id", String(512)),
    Column("events", JSON, nullable=False),
    Column("sequence", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

_SUMMARY_COLUMNS = [c.name for c in delivery_trace.columns if c.name not in ("delivery_id", "events", "sequence",
                                                                              "updated_at")]

# A URL without a driver (`postgresql://...`, as ops tools write it) gets the async driver we ship.
_ASYNC_DRIVERS = {"postgresql": "postgresql+asyncpg", "sqlite": "sqlite+aiosqlite"}

# Workers that start together take turns migrating: the pg_advisory_xact_lock key ("dlvtrace" as a bigint).
_MIGRATION_LOCK_KEY = int.from_bytes(b"dlvtrace", "big") & 0x7FFF_FFFF_FFFF_FFFF


def _async_url(database_url: str) -> URL:
    url = make_url(database_url)
    return url.set(drivername=_ASYNC_DRIVERS.get(url.drivername, url.drivername))


def _no_nul(value: Any) -> Any:
    # PostgreSQL text cannot hold NUL (a note typed by an operator or quoted from a provider might):
    # the write would fail at every retry and hold the delivery open forever.
    return value.replace("\0", "\ufffd") if isinstance(value, str) else value


def create_engine(database_url: str) -> AsyncEngine:
    url = _async_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets the help-desk read rows while the worker writes. The mode is kept in the file, and
            # switching a new file takes an exclusive lock: when another connection (a second worker
            # starting) holds it, that one switches the file and this one goes on.
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                log.debug("delivery_trace: another connection is switching %s to WAL", url.database)
            finally:
                cursor.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True)


class TraceStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, database_url: str) -> TraceStore:
        return cls(create_engine(database_url))

    async def migrate(self) -> None:
        """Create the table and its indexes if missing; safe to run at every worker start.

        Also when several workers start at once: "if not exists" DDL, and on PostgreSQL (where even that
        races on the catalog) one transaction at a time under an advisory lock.
        """
        async with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            for table in metadata.sorted_tables:
                await conn.execute(CreateTable(table, if_not_exists=True))
                for index in sorted(table.indexes, key=lambda index: str(index.name)):
                    await conn.execute(CreateIndex(index, if_not_exists=True))

    async def upsert(self, trace: DeliveryTrace, sequence: int) -> bool:
        """Write `trace` unless a row with a higher or equal sequence is there. True if written."""
        row = trace.model_dump(mode="json")
        values = {name: row[name] for name in _SUMMARY_COLUMNS}
        values.update(delivery_id=trace.delivery_id, events=row["events"], sequence=sequence,
                      updated_at=datetime.now(UTC))
        dialect = self.engine.dialect.name
        if dialect not in ("postgresql", "sqlite"):
            raise RuntimeError(f"delivery_trace supports PostgreSQL and SQLite, not {dialect}")
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        if dialect == "postgresql":
            values = {name: _no_nul(value) for name, value in values.items()}
        stmt = insert(delivery_trace).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[delivery_trace.c.delivery_id],
            set_={name: stmt.excluded[name] for name in values if name != "delivery_id"},
            where=delivery_trace.c.sequence < stmt.excluded.sequence,
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(stmt)
        return bool(result.rowcount)

    async def get(self, delivery_id: str) -> tuple[DeliveryTrace, int] | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(delivery_trace).where(delivery_trace.c.delivery_id == delivery_id))
                   ).mappings().first()
        if row is None:
            return None
        data = {name: row[name] for name in [*_SUMMARY_COLUMNS, "delivery_id", "events"]}
        return DeliveryTrace.model_validate(data), row["sequence"]

    async def close(self) -> None:
        await self.engine.dispose()


class TraceActivities:
    def __init__(self, store: TraceStore) -> None:
        self.store = store

    @activity.defn
    async def persist_trace(self, input: PersistTraceInput) -> bool:
        try:
            written = await self.store.upsert(input.trace, input.sequence)
        except (SQLAlchemyError, OSError) as exc:
            # The trace store being down must never fail a delivery: the workflow retries this forever
            # at a capped interval; the delivery itself goes on. The failure carries one line, not the
            # driver's traceback chain: with it the server stores "Failure exceeds size limit." as the
            # pending activity's last failure, which is what ops read while the delivery waits.
            log.debug("delivery %s: trace store unavailable", input.trace.delivery_id, exc_info=exc)
            raise failures.transient(f"trace store unavailable: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not written:
            log.info("delivery %s: trace sequence %d is not newer than the stored row; kept the stored one",
                     input.trace.delivery_id, input.sequence)
        return written
