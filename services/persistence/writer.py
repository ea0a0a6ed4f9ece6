"""The persistence writer: drains the record stream into PostgreSQL, read top to bottom.

own pending entries first -> entries idle too long at a dead writer -> new entries (blocking
read) -> decode (dead-letter what never will) -> write the batch in one transaction, retrying
with backoff for as long as PostgreSQL is away -> acknowledge and delete what was written.

Nothing is acknowledged before its transaction commits, so an outage, a crash or a stop
loses nothing: the entries wait in Redis (pending or unread) and are written, once, when
PostgreSQL answers again. A batch refused for its *data* is split to find the one record at
fault, which is dead-lettered; the rest are written. Any number of writers share the stream
through the consumer group; written entries are deleted, so the stream holds only backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence

from opentelemetry.trace import Span, SpanKind
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import keys, telemetry
from services.core.redis_client import REDIS_DOWN, REDIS_REFUSING, as_lost_connection
from services.core.settings import Settings, process_name
from services.core.streams import (
    GONE_CONSUMER_IDLE_SECONDS,
    Entry,
    dead_letter,
    ensure_group,
    forget_consumers,
    is_missing_group,
    parse_read,
)
from services.core.streams import reclaim as reclaim_idle
from services.persistence.backlog import backlog
from services.persistence.batch import Written, usage_day, write_batch
from services.persistence.database import create_engine, is_data_error
from services.persistence.records import MalformedRecord, PersistRecord, decode_record
from services.persistence.retention import oldest_kept_day

log = logging.getLogger(__name__)

backlog_gauge = Gauge(
    "orchestrator_persistence_backlog", "Finished tasks waiting to be written to PostgreSQL"
)
rows_written = Counter(
    "orchestrator_persistence_rows_written", "Rows written to PostgreSQL, by table", ["table"]
)
records_written = Counter(
    "orchestrator_persistence_records", "Records taken off the persistence stream, by outcome",
    ["outcome"],
)  # fmt: skip
write_failures = Counter(
    "orchestrator_persistence_write_failures", "Batch writes that failed and will be retried"
)
RECORD_OUTCOMES = ("written", "trimmed", "expired", "dead_lettered")

FIRST_RETRY_SECONDS = 0.1
BACKLOG_REPORT_SECONDS = 1.0


def writer_name(settings: Settings) -> str:
    return process_name(settings)


_DRIVER_CLASS = re.compile(r"^<class '[\w.]+'>: ")


def refusal(exc: BaseException) -> str:
    """The dead-letter reason of a record PostgreSQL refused: the database's own message with
    its SQLSTATE and constraint. `str()` of SQLAlchemy's error starts with the driver's class
    path, which is all the `deadletters list` table had room for."""
    if not isinstance(exc, sa_exc.DBAPIError) or exc.orig is None:
        return f"refused by the database: {exc}"  # not even sent: a value out of range
    driver = exc.orig.__cause__ or exc.orig  # asyncpg's own error, under SQLAlchemy's adapter
    message = getattr(driver, "message", None) or _DRIVER_CLASS.sub("", str(exc.orig))
    names = [f"SQLSTATE {state}"] if (state := getattr(exc.orig, "sqlstate", None)) else []
    if constraint := getattr(driver, "constraint_name", None):
        names.append(f'constraint "{constraint}"')
    where = f" ({', '.join(names)})" if names else ""
    return f"refused by the database{where}: {message}"


class PersistenceWriter:
    """One consumer of the `persist` group. `run()` until `stop()`; owns its engine unless given.

    `stop()` lets the batch in hand finish (or, while PostgreSQL is down, leaves it pending
    for the next writer) and returns from `run()`.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.engine = engine or create_engine(settings)
        self.owns_engine = engine is None
        self.consumer = consumer or writer_name(settings)
        self.stream = keys.PERSIST_RECORDS
        self.stopping = asyncio.Event()
        self.database_down = False
        self.batches = 0  # transactions committed: the unit the writer works in
        self._own_pending = True
        self._next_reclaim = 0.0
        self._next_report = 0.0
        self._spans: dict[str, Span] = {}  # of the batch in hand, by entry id (`_span`)

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        grouped = False  # made in the loop: Redis may refuse it at start as any time later
        try:
            while not self.stopping.is_set():
                try:
                    if not grouped:
                        await ensure_group(self.redis, self.stream, keys.PERSIST_GROUP)
                        grouped = True
                    entries = await self._next_batch()
                    if entries:
                        await self._persist(entries)
                    await self._report_backlog()
                except (*REDIS_DOWN, *REDIS_REFUSING) as exc:
                    # Refusing: out of memory, or a primary demoted under the writer. Nothing
                    # else ends this loop's task (the worker does not restart it).
                    log.warning("persistence writer: redis unavailable (%s)", exc)
                    self._own_pending = True
                    await self._pause(self.settings.persist_retry_max_seconds)
                except ResponseError as exc:
                    if as_lost_connection(exc) is not None:  # UNBLOCKED by a failover
                        log.warning("persistence writer: blocking read ended (%s)", exc)
                        self._own_pending = True
                        continue
                    if not is_missing_group(exc):
                        raise
                    log.warning("persistence writer: consumer group missing, recreating")
                    grouped = False
        finally:
            with contextlib.suppress(*REDIS_DOWN, *REDIS_REFUSING, ResponseError):
                await forget_consumers(
                    self.redis, self.stream, keys.PERSIST_GROUP, only=self.consumer
                )
            if self.owns_engine:
                await self.engine.dispose()

    async def _next_batch(self) -> list[Entry]:
        """Own pending entries first, then those idle at a dead writer, then new ones."""
        count = self.settings.persist_batch_size
        if self._own_pending:
            reply = await self.redis.xreadgroup(
                keys.PERSIST_GROUP, self.consumer, {self.stream: "0"}, count=count
            )
            entries = parse_read(reply)
            if entries:
                return entries
            self._own_pending = False
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_reclaim:
            self._next_reclaim = loop.time() + self.settings.persist_reclaim_idle_seconds / 2
            idle_ms = int(self.settings.persist_reclaim_idle_seconds * 1000)
            claimed = await reclaim_idle(
                self.redis, self.stream, keys.PERSIST_GROUP, self.consumer, idle_ms, count
            )
            await forget_consumers(
                self.redis,
                self.stream,
                keys.PERSIST_GROUP,
                keep=self.consumer,
                idle_seconds=GONE_CONSUMER_IDLE_SECONDS,
            )
            if claimed:
                return claimed
        reply = await self.redis.xreadgroup(
            keys.PERSIST_GROUP,
            self.consumer,
            {self.stream: ">"},
            count=count,
            block=int(self.settings.worker_sleep_seconds * 1000),
        )
        return parse_read(reply)

    async def _persist(self, entries: list[Entry]) -> None:
        decoded: list[tuple[Entry, PersistRecord]] = []
        # `orchestrator prune` deletes the usage markers of days before this one: a record of
        # such a day (a dead letter replayed, a backlog kept through a month-long outage) can
        # no longer be told from one counted before, and its history would be pruned anyway.
        oldest_day = oldest_kept_day(self.settings.history_retention_days)
        for entry in entries:
            raw = entry.raw_action
            if not entry.fields:  # trimmed while pending: nothing left to write
                await self._done([entry.id])
                records_written.labels("trimmed").inc()
            elif raw is None:
                await self._dead_letter(entry, "stream entry has no 'action' field")
            else:
                try:
                    record = decode_record(raw)
                    day = usage_day(record)
                except MalformedRecord as exc:
                    await self._dead_letter(entry, f"malformed record: {exc.reason}")
                    continue
                except Exception as exc:
                    # Raised out of `run()`, the entry came back first to every restarted
                    # writer of this worker, which stopped on it again, for ever.
                    why = f"unreadable record: {type(exc).__name__}: {exc}"
                    await self._dead_letter(entry, why)
                    continue
                if day < oldest_day:
                    log.warning(
                        "persistence writer: record of task %s (%s) is past the history "
                        "retention, not written", record.task_id, day,
                    )  # fmt: skip
                    await self._done([entry.id], [record])
                    records_written.labels("expired").inc()
                else:
                    decoded.append((entry, record))
        if not decoded:
            return
        for entry, record in decoded:
            if (span := self._span(entry, record, len(decoded))) is not None:
                self._spans[entry.id] = span
        try:
            written = await self._write_until_done(decoded)
            if written:
                await self._done([entry.id for entry, _ in decoded], [r for _, r in decoded])
        except BaseException as exc:
            for span in self._spans.values():
                telemetry.fail(span, f"not written: {exc!r}", error_type=type(exc).__name__)
            raise
        else:
            if not written:
                for span in self._spans.values():
                    telemetry.fail(span, "the writer stopped first", error_type="stopped")
        finally:
            for span in self._spans.values():
                span.end()
            self._spans = {}

    def _span(self, entry: Entry, record: PersistRecord, batch: int) -> Span | None:
        """A CONSUMER span on the message's trace, for a record whose send was traced: an SRE
        following a message sees when (and whether) its history was written. None costs
        nothing for untraced records."""
        parent = telemetry.remote_parent(record.trace_context)
        if parent is None:
            return None
        attributes = telemetry.messaging_attributes(
            self.stream, "process", message_id=entry.id, group=keys.PERSIST_GROUP, batch=batch
        )
        attributes["orchestrator.task_id"] = record.task_id
        attributes["db.system.name"] = "postgresql"
        return telemetry.tracer().start_span(
            f"process {self.stream}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )

    async def _write_until_done(self, batch: Sequence[tuple[Entry, PersistRecord]]) -> bool:
        """True once the batch is written (its refused records dead-lettered); False on stop."""
        delay = FIRST_RETRY_SECONDS
        split = False
        while True:
            try:
                if split:
                    await self._write_one_by_one(batch)
                else:
                    self._count(await self._write([record for _, record in batch]), len(batch))
            except Exception as exc:  # classified here, so the loop never dies of it
                if is_data_error(exc) and not split:
                    split = True
                    continue
                write_failures.inc()
                if delay == FIRST_RETRY_SECONDS:  # once per batch: an outage retries for hours
                    for span in self._spans.values():
                        span.add_event("write failed, retrying", {"error.type": type(exc).__name__})
                if not self.database_down:
                    # A timeout's text is empty: its type says what happened.
                    why = str(exc) or type(exc).__name__
                    log.warning("persistence writer: database unavailable, retrying: %s", why)
                self.database_down = True
                await self._keep_claim([entry for entry, _ in batch])
                await self._report_backlog()
                if await self._pause(delay):
                    return False
                delay = min(delay * 2, self.settings.persist_retry_max_seconds)
                continue
            if self.database_down:
                log.info("persistence writer: database answers again")
            self.database_down = False
            return True

    async def _write(self, records: Sequence[PersistRecord]) -> Written:
        async with self.engine.begin() as conn:
            written = await write_batch(conn, records)
        self.batches += 1
        return written

    async def _write_one_by_one(self, batch: Sequence[tuple[Entry, PersistRecord]]) -> None:
        """Find the records PostgreSQL refuses for their data: dead-letter them, write the rest.

        Any other failure propagates: the caller retries the whole batch, and the records
        written here meanwhile are skipped then (writes are idempotent).
        """
        for entry, record in batch:
            try:
                written = await self._write([record])
            except Exception as exc:  # only a data error is this record's fault
                if not is_data_error(exc):
                    raise
                await self._dead_letter(entry, refusal(exc))
                continue
            self._count(written, 1)

    def _count(self, written: Written, records: int) -> None:
        records_written.labels("written").inc(records)
        for table, count in written.rows.items():
            rows_written.labels(table).inc(count)

    async def _done(self, ids: list[str], records: Sequence[PersistRecord] = ()) -> None:
        """Acknowledge and delete: the stream keeps only what is still to be written. The
        records' tasks leave their sessions' lists of records on their way (written, or
        dead-lettered: a history read no longer waits for them)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, keys.PERSIST_GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            for record in records:
                unwritten = keys.session_unwritten(record.tenant_id, record.session_id)
                pipe.zrem(unwritten, record.task_id)
            await pipe.execute()

    async def _dead_letter(self, entry: Entry, reason: str) -> None:
        span = self._spans.get(entry.id)
        if span is not None:
            telemetry.fail(span, reason, error_type="dead_lettered")
        await dead_letter(self.redis, entry, keys.PERSIST_GROUP, reason)
        await self.redis.xdel(self.stream, entry.id)
        records_written.labels("dead_lettered").inc()

    async def _keep_claim(self, entries: list[Entry]) -> None:
        """Reset the entries' idle time, so other writers do not take over a batch in hand."""
        with contextlib.suppress(*REDIS_DOWN):
            await self.redis.xclaim(
                self.stream,
                keys.PERSIST_GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=[entry.id for entry in entries],
                justid=True,
            )

    async def _report_backlog(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_report:
            return
        self._next_report = loop.time() + BACKLOG_REPORT_SECONDS
        with contextlib.suppress(*REDIS_DOWN):
            backlog_gauge.set(await backlog(self.redis))

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` or until stopped; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()
