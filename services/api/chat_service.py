"""Sending, cancelling and looking up chat tasks: the same code for REST and the socket.

A send creates the task state and its `chat.status` event, records where the task lives and its
deadline, and adds `chat.process` to the AES stream of its priority, state first, so an AES
answer can never find no task. On one server that and the rate limits are one script
(send.lua): one round trip. With an `Idempotency-Key`, or on a cluster (keys in different
slots), the limits are one round trip and the enqueue another pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import Span
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.api import metrics
from services.api.admission import Admission, SendRules, check_message
from services.api.models import Accepted, Cancelled, SendRequest, TaskView
from services.core import clock, events, keys, telemetry
from services.core.actions import (
    ACTION_FIELD,
    ChatCancel,
    ChatProcess,
    MalformedAction,
    User,
    decode_action,
    encode_action,
    utcnow,
)
from services.core.auth import Principal
from services.core.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    NotFound,
    OrchestratorError,
    Unavailable,
)
from services.core.ids import new_id
from services.core.logs import bind_for_this_task
from services.core.partition_count import PartitionCheck, PartitionCountMismatch
from services.core.ratelimit import (
    RateDecision,
    check_arguments,
    check_keys,
    rate_decision,
    rate_limit_headers,
)
from services.core.redis_client import COMMAND_TIMEOUT_SECONDS, REDIS_DOWN, is_cluster
from services.core.scripts import missing_script
from services.core.settings import Settings
from services.core.task_stop import cancel_and_wait
from services.core.tasks import (
    Outcome,
    TaskRef,
    TaskStatus,
    TaskStore,
    Verdict,
    encode_json,
    parse_outcome,
)
from services.core.tiers import MAX_TASK_TIMEOUT_SECONDS
from services.persistence.history import HistoryStore
from services.persistence.records import (
    MalformedRecord,
    publish_finished,
    publish_record,
    record_of_erased,
)

AES_STREAM_MAXLEN = 1_000_000
IDEMPOTENCY_TTL_SECONDS = 86_400
RECANCEL_SECONDS = 10
ABANDON_RETRY_SECONDS = 30.0
ABANDON_RETRY_INTERVAL = 0.2
# How long a send waits for the task of a concurrent send with its Idempotency-Key to be
# written (that send's enqueue takes a round trip or two; a Redis call's own bound is 2 s),
# polling every REPLAY_POLL_SECONDS.
IN_FLIGHT_SECONDS = 2.0 * COMMAND_TIMEOUT_SECONDS
REPLAY_POLL_SECONDS = 0.01
# A takeover lost to another request is followed by a wait for that one's task; losing
# again and again means requests keep abandoning the key's tasks.
RESERVE_ATTEMPTS = 3
# How long a stopping api waits for the sends its server's shutdown cut (they run on, see
# `send`) before closing Redis under them: as long as a concurrent retry waits for one.
STOP_GRACE_SECONDS = IN_FLIGHT_SECONDS

ERASED_SESSION_NOTICE_SECONDS = 60
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _NewTask:
    """A task about to be created: its state's first event and fields, and its action."""

    ref: TaskRef
    action: ChatProcess
    body: str
    fields: dict[str, str]  # the state hash; "action" holds the encoded action
    stream: str
    ttl: int  # how long its state and location live: past its deadline by TASK_TTL_SECONDS


@dataclass(frozen=True, slots=True)
class Sent:
    accepted: Accepted
    headers: dict[str, str]
    replayed: bool


@dataclass(slots=True)
class SendAttempt:
    """What a send had done when its caller stopped waiting: the id its task has if it was
    queued (None: cut before one was chosen, nothing of it can be queued)."""

    task_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Asked:
    """What a send with an `Idempotency-Key` asks for, to tell a retry from another request."""

    session_id: str | None  # None: the request named no session
    agent_id: str
    request: SendRequest

    def made(self, ref: TaskRef, state: dict[str, Any]) -> bool:
        """Whether the task the key names was made by this same request."""
        raw = state.get("action")
        if not raw:
            return True  # nothing kept to compare with
        earlier = decode_action(raw.encode() if isinstance(raw, str) else raw)
        if not isinstance(earlier, ChatProcess):
            return True
        request = self.request
        session = self.session_id or ref.session_id
        return (ref.session_id, earlier.agent_id, earlier.message, earlier.stream) == (
            session,
            self.agent_id,
            request.message,
            request.stream,
        ) and earlier.context == request.context


def _mark_replayed(task_id: str, state: dict[str, Any]) -> None:
    """A retry answered with an earlier request's task: its span names that task and links
    to the message's trace (it was a trace of its own, with nothing leading to the message's:
    one trace per message, the retry a pointer to it)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attribute("orchestrator.task_id", task_id)
    span.set_attribute("orchestrator.replayed", True)
    raw = state.get("action")
    try:
        earlier = decode_action(raw.encode() if isinstance(raw, str) else raw) if raw else None
    except (MalformedAction, RecursionError):
        return
    if isinstance(earlier, ChatProcess):
        context = telemetry.remote_parent(earlier.trace_context)
        if context is not None:
            span.add_link(trace.get_current_span(context).get_span_context())


def _digest(idempotency_key: str) -> str:
    """Keys are client strings of any shape; their digest is what reaches Redis."""
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


_json_decoder = msgspec.json.Decoder()


def _log_failure(steps: asyncio.Future[Sent]) -> None:
    """How a send whose request was cancelled ended, when it failed (nobody awaits it)."""
    failure = None if steps.cancelled() else steps.exception()
    # A refusal or an outage was the client's to hear, and it has gone: only a fault is news.
    if failure is not None and not isinstance(failure, (OrchestratorError, *REDIS_DOWN)):
        log.error("a send cut by its request's cancel failed", exc_info=failure)


def maybe_queued(task_id: str, why: str = "redis did not answer in time") -> Unavailable:
    """The 503 of a send cut before it knew whether its task was queued: it may yet run."""
    return Unavailable(
        f"{why}; the message may still be queued as task {task_id}: "
        f"check GET /api/chat/tasks/{task_id} before sending it again "
        "(or send with an Idempotency-Key)",
        details={"task_id": task_id, "queued": "unknown"},
    )


class ChatService:
    def __init__(
        self, redis: Redis, tasks: TaskStore, admission: Admission, settings: Settings
    ) -> None:
        self.redis = redis
        self.tasks = tasks
        self.admission = admission
        self.settings = settings
        self.history: HistoryStore | None = None  # set when PostgreSQL is configured
        self._background: set[asyncio.Task[None]] = set()
        # Sends in several round trips, which a cancel of their request does not stop.
        self._in_flight: set[asyncio.Future[Sent]] = set()
        # Tasks this process abandoned and could not mark yet (`_abandon_later`).
        self._abandoning: set[str] = set()
        # An Idempotency-Key never outlives the task it names (which lives TASK_TTL_SECONDS
        # past its deadline): a key found without its task is taken for a send that never
        # queued one, and a retry then sent the message again.
        self._idempotency_ttl = min(IDEMPOTENCY_TTL_SECONDS, settings.task_ttl_seconds)
        # Checked at start when Redis answered then (services/cli/main.py); else before the
        # first send: a task routed with another count than the workers' is never answered.
        self._partitions = PartitionCheck(redis, settings.callback_partitions)
        self.partition_mismatch: PartitionCountMismatch | None = None

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Let the sends uvicorn's shutdown cut reach their end before Redis is closed.

        A cut send goes on (its limits taken, its key reserved: see `send`), and its client was
        told the message may still be queued as its task; closing Redis under it made that
        false and left the key naming a task that never came. Those still waiting on Redis
        after `grace` are cut, as are the retries of abandoned sends (`_abandon_later`): a
        process that exits does not get to finish them anyway."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace)
        await cancel_and_wait(*self._in_flight, *self._background)

    async def partitions_agree(self) -> bool:
        """Whether this pod's count is the installation's (a round trip until it was once):
        readiness asks, and every send, so a pod that could not check at its start neither
        routes a task nor gets traffic once Redis tells it otherwise."""
        try:
            await self._partitions.ensure()
        except PartitionCountMismatch as exc:
            self.partition_mismatch = exc
            # A line a probe or a send: bounded (RepeatLimiter).
            log.warning("sends refused, not ready: %s", exc)
            return False
        self.partition_mismatch = None
        return True

    async def _ensure_partitions(self) -> None:
        if not await self.partitions_agree():
            raise Unavailable(
                "this api pod is misconfigured and sends nothing; its log says why",
                code="misconfigured",
            )

    async def send(
        self,
        principal: Principal,
        request: SendRequest,
        *,
        session_id: str | None,
        agent_id: str,
        idempotency_key: str | None = None,
        attempt: SendAttempt | None = None,
    ) -> Sent:
        """Admit and enqueue a message; a repeated `Idempotency-Key` returns the first task.

        `session_id` None: the request named none, and a new session is made (a retry of it
        under its key is answered with the first one's task and session). `attempt` learns
        the task's id as soon as it is chosen, for a caller that may stop waiting."""
        if len(request.message) > self.settings.max_message_chars:
            raise InvalidInput(
                f"message is longer than {self.settings.max_message_chars} characters",
                details={"limit": self.settings.max_message_chars},
                code="message_too_long",
            )
        check_message(request.message)
        tenant_id = principal.tenant_id
        asked = _Asked(session_id, agent_id, request)
        session_id = session_id or new_id()
        bind_for_this_task(session_id=session_id)  # the request's later lines name it
        await clock.ensure_synced(self.redis)  # created_at and the deadline: Redis's clock
        await self._ensure_partitions()
        idempotency = None
        if idempotency_key is not None:
            idempotency = keys.tenant_idempotency(tenant_id, _digest(idempotency_key))
            earlier = await self._replay(principal, idempotency, asked)
            if earlier is not None:
                return await self._with_limits(principal, earlier)
        rules = await self.admission.send_rules(tenant_id, session_id, agent_id, request)
        ref = TaskRef(tenant_id, session_id, new_id())
        if attempt is not None:
            attempt.task_id = ref.task_id
        if idempotency is None and not is_cluster(self.redis):
            # One script: a cancel of the request cannot cut it in half.
            outcome, headers = await self._send_in_one_step(
                ref, agent_id, principal, request, rules
            )
            return self._accepted(ref, agent_id, rules, outcome, headers)
        # Reserving the key, taking the limits and queueing the task are separate round trips
        # that must go together: a request cancelled between them (uvicorn cancels handlers
        # still running when its graceful shutdown ends) kept the limits it took with no task
        # queued, and the retry under the same key waited for that task, then was refused 429.
        # Once begun they run to their end; the retry finds the task.
        steps = asyncio.ensure_future(
            self._send_in_steps(ref, agent_id, principal, request, rules, idempotency, asked)
        )
        self._in_flight.add(steps)
        steps.add_done_callback(self._in_flight.discard)
        try:
            return await asyncio.shield(steps)
        except asyncio.CancelledError:
            steps.add_done_callback(_log_failure)
            raise

    async def _send_in_steps(
        self,
        ref: TaskRef,
        agent_id: str,
        principal: Principal,
        request: SendRequest,
        rules: SendRules,
        idempotency: str | None,
        asked: _Asked,
    ) -> Sent:
        """With an Idempotency-Key, or on a cluster: reserve the key, take the limits, queue."""
        # The key is reserved before the limits (on a cluster their keys are in other slots):
        # a double submit then waits for the first one's task instead of being refused by the
        # limit the first one took the last of (429 for a message sent).
        if idempotency is not None:
            earlier = await self._reserve(principal, idempotency, ref.task_id, asked)
            if earlier is not None:
                return await self._with_limits(principal, earlier)
        try:
            decisions = await self.admission.limiter.check_many(rules.checks)
            admitted = self.admission.judge(rules, decisions)
        except Exception:
            if idempotency is not None:  # refused or failed: the key names nothing
                with contextlib.suppress(*REDIS_DOWN):
                    await self._swap(idempotency, ref.task_id, "")
            raise
        outcome = await self._send_in_two_steps(
            ref, agent_id, principal, request, rules, idempotency
        )
        return self._accepted(ref, agent_id, rules, outcome, rate_limit_headers(admitted.decision))

    def _accepted(
        self,
        ref: TaskRef,
        agent_id: str,
        rules: SendRules,
        outcome: Outcome,
        headers: dict[str, str],
    ) -> Sent:
        if outcome.verdict is Verdict.exists:
            # A fresh 128-bit id exists only if an earlier attempt of this very call created
            # it (redis-py resends a command after a lost connection): accepted once.
            log.info("send retried after a lost connection; the task was already created")
        elif outcome.verdict is not Verdict.ok:
            raise Conflict(f"task {ref.task_id} could not be created ({outcome.verdict})")
        metrics.tasks_submitted.labels(rules.quota.limits.priority).inc()
        metrics.tasks.labels("accepted", rules.quota.tier).inc()
        log.info(
            "message accepted",
            extra={
                "tenant_id": ref.tenant_id,
                "session_id": ref.session_id,
                "task_id": ref.task_id,
                "agent_id": agent_id,
                "tier": rules.quota.tier,
            },
        )
        accepted = Accepted(
            task_id=ref.task_id, status=TaskStatus.processing, session_id=ref.session_id
        )
        return Sent(accepted, headers, replayed=False)

    async def _send_in_one_step(
        self,
        ref: TaskRef,
        agent_id: str,
        principal: Principal,
        request: SendRequest,
        rules: SendRules,
    ) -> tuple[Outcome, dict[str, str]]:
        """On one server: limits, budget and enqueue in one script; raises the refusal."""
        with self._producer(ref, rules) as span:
            task = self._new_task(ref, agent_id, principal, request, rules, span)
            decisions, outcome = await self._admit_and_enqueue_once(task, rules)
            if outcome is None:
                span.set_attribute("orchestrator.refused", True)
        if decisions is None:  # a retried call whose first run created the task
            assert outcome is not None
            return outcome, {}
        admitted = self.admission.judge(rules, decisions)  # a refusal: raised after the span
        assert outcome is not None  # None only with a refusal
        return outcome, rate_limit_headers(admitted.decision)

    async def _admit_and_enqueue_once(
        self, task: _NewTask, rules: SendRules
    ) -> tuple[list[RateDecision] | None, Outcome | None]:
        """`_admit_and_enqueue`, sent again once if Redis did not answer in time.

        A timeout is not a refusal: Redis may be busy (a big command, a stall) and run the
        script when it gets to it. Answered 503 "retry", the client sent the message again and
        both ran: the message answered (and billed) twice. Sent again, the script runs after
        the first one and answers `exists` (the task id is the same), or creates the task if
        the first never ran: once either way. If Redis stays silent, the 503 says the message
        may still be queued, and as which task."""
        try:
            return await self._admit_and_enqueue(task, rules)
        except RedisTimeoutError:
            pass
        try:
            return await self._admit_and_enqueue(task, rules)
        except RedisTimeoutError as exc:
            raise maybe_queued(task.ref.task_id) from exc

    async def _send_in_two_steps(
        self,
        ref: TaskRef,
        agent_id: str,
        principal: Principal,
        request: SendRequest,
        rules: SendRules,
        idempotency: str | None,
    ) -> Outcome:
        """The enqueue of an admitted send (see `_enqueue`)."""
        with self._producer(ref, rules) as span:
            task = self._new_task(ref, agent_id, principal, request, rules, span)
            try:
                return await self._enqueue(task)
            except REDIS_DOWN:
                if is_cluster(self.redis):
                    await self._abandon(ref, idempotency)
                raise

    def _producer(self, ref: TaskRef, rules: SendRules) -> AbstractContextManager[Span]:
        return telemetry.producer(
            keys.aes_stream(rules.quota.limits.priority),
            **{"orchestrator.task_id": ref.task_id, "orchestrator.attempt": 1},
        )

    def _new_task(
        self,
        ref: TaskRef,
        agent_id: str,
        principal: Principal,
        request: SendRequest,
        rules: SendRules,
        span: Span,
    ) -> _NewTask:
        """The task's action (carrying `span`'s trace context), first event and state."""
        limits = rules.quota.limits
        now = utcnow()
        partition = keys.partition_of(
            ref.tenant_id, ref.session_id, self.settings.callback_partitions
        )
        action = ChatProcess(
            tenant_id=ref.tenant_id,
            session_id=ref.session_id,
            task_id=ref.task_id,
            created_at=now,
            agent_id=agent_id,
            message=request.message,
            user=User(id=principal.user_id, name=principal.name),
            callback_queue=keys.callback_stream(partition),
            context=request.context,
            stream=request.stream,
            priority=limits.priority,
            deadline=now + timedelta(seconds=limits.task_timeout_seconds),
            trace_context=telemetry.inject(span),
        )
        status_data: dict[str, Any] = {"status": TaskStatus.processing, "attempt": 1}
        if request.request_id is not None:
            status_data["request_id"] = request.request_id
        body = events.event_body(events.CHAT_STATUS, status_data, ref.task_id)
        fields = self._fields(action, principal, rules)
        # Alive until its deadline and TASK_TTL_SECONDS after: with a TTL shorter than the
        # tier's timeout, a running task's state expired under it (404, its answer dropped).
        ttl = self.settings.task_ttl_seconds + limits.task_timeout_seconds
        return _NewTask(ref, action, body, fields, keys.aes_stream(limits.priority), ttl)

    def _fields(
        self, action: ChatProcess, principal: Principal, rules: SendRules
    ) -> dict[str, str]:
        """The task's state hash as created."""
        return {
            "status": TaskStatus.processing,
            "agent_id": action.agent_id,
            "user_id": principal.user_id,
            "stream": "1" if action.stream else "0",
            "priority": action.priority,
            "tier": rules.quota.tier,
            "created_ms": str(int(action.created_at.timestamp() * 1000)),
            "deadline": action.deadline.isoformat(),
            "action": encode_action(action).decode(),
        }

    def _placement(self, task: _NewTask) -> tuple[str, str, float]:
        """Where the task lives (`task_location` key and value) and its deadline's score."""
        ref = task.ref
        return (
            keys.task_location(ref.task_id),
            self.tasks.location_value(ref),
            task.action.deadline.timestamp(),
        )

    def _deadlines(self, ref: TaskRef) -> tuple[str, str]:
        """The task's deadlines set (its session's partition) and its member there."""
        partition = keys.partition_of(
            ref.tenant_id, ref.session_id, self.settings.callback_partitions
        )
        member = keys.task_member(ref.tenant_id, ref.session_id, ref.task_id)
        return keys.partition_deadlines(partition), member

    async def _admit_and_enqueue(
        self, task: _NewTask, rules: SendRules
    ) -> tuple[list[RateDecision] | None, Outcome | None]:
        """The rate limits, the budget and the enqueue in one script (send.lua): the limits'
        decisions, and the task's outcome, or None when a limit or the budget refused (then
        nothing was created and what an allowing limit took was given back). No decisions
        when the task already existed: redis-py resent the script after a lost connection,
        and its first run had created the task."""
        location, where, deadline = self._placement(task)
        deadlines, member = self._deadlines(task.ref)
        task_keys, task_args = self.tasks.script_args(
            task.ref, "create", attempt=0, seq=0, body=task.body, fields=task.fields, ttl=task.ttl
        )
        session_args = check_arguments(rules.session, None)
        tenant_args = check_arguments(rules.tenant, None)
        script_keys = [
            *check_keys(rules.session),
            *check_keys(rules.tenant),
            *task_keys,
            location,
            deadlines,
            task.stream,
        ]
        args: list[Any] = [
            len(session_args),
            len(tenant_args),
            len(task_args),
            *session_args,
            *tenant_args,
            *task_args,
            where,
            task.ttl,
            member,
            deadline,
            AES_STREAM_MAXLEN,
            ACTION_FIELD,
            task.fields["action"],
        ]
        session, tenant, created = await self.tasks.scripts.send(keys=script_keys, args=args)
        if session == 0:  # the task existed: this call was retried after it ran (send.lua)
            return None, parse_outcome(created)
        decisions = [
            rate_decision(rules.session.limit_per_minute, session),
            rate_decision(rules.tenant.limit_per_minute, tenant),
        ]
        return decisions, None if created == 0 else parse_outcome(created)

    async def _enqueue(self, task: _NewTask) -> Outcome:
        """Task state and its first event, its location, its deadline, then the action: one
        round trip, state first so no answer can find no task."""
        ref, stream = task.ref, task.stream
        encoded = task.fields["action"]
        location, where, deadline = self._placement(task)
        deadlines, member = self._deadlines(task.ref)
        # A cluster pipeline runs its commands on several nodes at once, in no order: there the
        # action is added once the task state is written (one more round trip).
        cluster = is_cluster(self.redis)
        async with self.redis.pipeline(transaction=False) as pipe:
            await self.tasks.apply(
                ref, "create", body=task.body, fields=task.fields, pipe=pipe, ttl=task.ttl
            )
            pipe.set(location, where, ex=task.ttl)
            pipe.zadd(deadlines, {member: deadline})
            if not cluster:
                pipe.xadd(
                    stream, {ACTION_FIELD: encoded}, maxlen=AES_STREAM_MAXLEN, approximate=True
                )
            created, *rest = await pipe.execute(raise_on_error=False)
        if missing_script(created):
            # Redis lost its scripts (restarted): the rest of the pipeline ran, so create the
            # task state now (the script is idempotent) before any answer can look for it.
            await self.tasks.scripts.load()
            outcome = await self.tasks.apply(
                ref, "create", body=task.body, fields=task.fields, ttl=task.ttl
            )
            assert outcome is not None
        elif isinstance(created, Exception):
            raise created
        else:
            outcome = parse_outcome(created)
        if cluster:
            failed = next((reply for reply in rest if isinstance(reply, Exception)), None)
            if failed is not None:
                raise failed
            await self.redis.xadd(
                stream, {ACTION_FIELD: encoded}, maxlen=AES_STREAM_MAXLEN, approximate=True
            )
        return outcome

    async def _abandon(self, ref: TaskRef, idempotency: str | None) -> None:
        """On a cluster the task state and the action live on different nodes, so a send can
        fail after its task was created: fail that task with a clear error (its socket gets
        `chat.error`), and free the `Idempotency-Key` so the client's retry (it got 503) makes
        a new task instead of being told about one that was never queued.

        The two are tried on their own: the key usually lives on another node than the task,
        and when only the task's node is down the key must be freed at once. Were it kept
        until the task could be marked, a retry arriving after the node came back and before
        the mark would be answered 202 with this task, then get its `chat.error`. What could
        not be done is retried in the background for a while; until the task is marked, a
        retry that reaches this process is not answered with it either (`_abandoning`)."""
        freed = idempotency is None or await self._free_key(ref, idempotency)
        failed = await self._fail_unqueued(ref)
        if freed and failed:
            return
        if not failed:
            self._abandoning.add(ref.task_id)
        retry = asyncio.get_running_loop().create_task(
            self._abandon_later(ref, None if freed else idempotency, failed=failed)
        )
        self._background.add(retry)
        retry.add_done_callback(self._background.discard)
        retry.add_done_callback(lambda _: self._abandoning.discard(ref.task_id))

    async def _abandon_later(self, ref: TaskRef, idempotency: str | None, *, failed: bool) -> None:
        """Retry what `_abandon` could not do, every `ABANDON_RETRY_INTERVAL` seconds: a
        short interval, since until both are done a retry that finds the key (when the key
        and the task share the node that was down) is answered with the abandoned task."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ABANDON_RETRY_SECONDS
        while loop.time() < deadline:
            await asyncio.sleep(ABANDON_RETRY_INTERVAL)
            if idempotency is not None and await self._free_key(ref, idempotency):
                idempotency = None
            failed = failed or await self._fail_unqueued(ref)
            if idempotency is None and failed:
                return
        log.warning("a task that was never queued could not be failed", extra={"task": ref})

    async def _free_key(self, ref: TaskRef, idempotency: str) -> bool:
        """Delete the `Idempotency-Key` if it still names this task (a retry may have taken
        it over already); False if Redis could not be reached."""
        try:
            await self._swap(idempotency, ref.task_id, "")
        except REDIS_DOWN:
            return False
        return True

    async def _swap(self, idempotency: str, seen: str, task_id: str) -> bool:
        """Make the key name `task_id` ('': delete it) if it still names `seen`."""
        swapped = await self.tasks.scripts.compare_and_set(
            keys=[idempotency], args=[seen, task_id, self._idempotency_ttl]
        )
        return bool(swapped)

    async def _reserve(
        self, principal: Principal, idempotency: str, task_id: str, asked: _Asked
    ) -> Sent | None:
        """Make the `Idempotency-Key` name `task_id`, or answer with the task it names.

        The key may name a task still being created by a concurrent request (a double submit
        reaching two pods at once: waited for), or one that will never be queued (abandoned,
        or its request died between reserving the key and creating the task): that one is
        taken over, by one request only, since the takeover is a compare-and-set; the others
        then find the winner's task."""
        for _ in range(RESERVE_ATTEMPTS):
            if await self.redis.set(idempotency, task_id, nx=True, ex=self._idempotency_ttl):
                return None
            seen, earlier = await self._lookup(
                principal, idempotency, asked, wait=IN_FLIGHT_SECONDS
            )
            if earlier is not None:
                return earlier
            if seen is not None and await self._swap(idempotency, seen, task_id):
                return None
        raise Conflict(
            "another request with this Idempotency-Key is being processed; send it again",
            code="idempotency_conflict",
        )

    async def _fail_unqueued(self, ref: TaskRef) -> bool:
        """End the task with `chat.error` `unavailable`; False if Redis could not be reached."""
        error = {
            "code": "unavailable",
            "message": "the message was not queued; send it again",
            "details": {},
        }
        try:
            await self.tasks.apply(
                ref,
                "failed",
                body=events.event_body(events.CHAT_ERROR, error, ref.task_id),
                fields={
                    "status": TaskStatus.failed,
                    "error": encode_json(error),
                    "abandoned": "1",
                },
            )
        except REDIS_DOWN:
            return False
        return True

    async def _with_limits(self, principal: Principal, replay: Sent) -> Sent:
        """A replay with the `RateLimit-*` headers every accepted send carries: where the
        limits of its session stand now (the replay itself took nothing)."""
        session_id = replay.accepted.session_id
        standing = await self.admission.standing(principal.tenant_id, session_id)
        return Sent(replay.accepted, rate_limit_headers(standing), replayed=True)

    async def _replay(self, principal: Principal, idempotency: str, asked: _Asked) -> Sent | None:
        """The task an earlier request with this key created, if any (within 24 hours)."""
        _, earlier = await self._lookup(principal, idempotency, asked)
        return earlier

    async def _lookup(
        self, principal: Principal, idempotency: str, asked: _Asked, *, wait: float = 0.0
    ) -> tuple[str | None, Sent | None]:
        """The task id the key names, and that task if a retry is to be answered with it.

        With `wait`, a task the key names but that is not written yet is waited for, that
        many seconds at most: the request holding the key may be between its reservation and
        its enqueue (a double submit reaching two pods at once), and answering None then
        would make a second task for one key."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            task_id = _text(await self.redis.get(idempotency))
            if task_id is None:
                return None, None
            ref = await self.tasks.locate(task_id)
            if ref is None and await self.tasks.was_erased(task_id):
                # Sent, then erased with its session: not a send that never queued its task.
                raise Conflict(
                    "the task this Idempotency-Key names was erased with its session; "
                    "send the message with a new key to send it again",
                    details={"task_id": task_id},
                )
            if ref is not None and ref.tenant_id != principal.tenant_id:
                return task_id, None
            state = None if ref is None else await self.tasks.read(ref)
            if state is not None or loop.time() >= deadline:
                break
            await asyncio.sleep(REPLAY_POLL_SECONDS)
        if ref is None or state is None or self._abandoned(ref, state):
            # Never queued (see `_abandon`; this process may not have marked it yet), or never
            # created: on a cluster the task's location can be written while its state
            # (another node) was not; or its request died after reserving the key. The retry
            # makes a new task.
            return task_id, None
        # In a thread of its own: its stack starts empty. Decoding the kept action (and
        # comparing contexts) here, deeper in the stack than the body was decoded, hit the
        # recursion limit for the deepest context a send accepts: its retry was a 500.
        if not await asyncio.to_thread(asked.made, ref, state):
            # A retry carries the same request; another one under the key is a client's bug
            # that a replay would hide (its message never sent, the other session's task
            # answered): refused, as the IETF Idempotency-Key draft asks.
            raise InvalidInput(
                "this Idempotency-Key was used for another request (a different message, "
                "session, agent, context or stream flag) within the last 24 hours",
                code="idempotency_key_reused",
            )
        _mark_replayed(ref.task_id, state)
        status = state.get("status") or TaskStatus.processing
        accepted = Accepted(task_id=ref.task_id, status=status, session_id=ref.session_id)
        return task_id, Sent(accepted, {}, replayed=True)

    def _abandoned(self, ref: TaskRef, state: dict[str, Any]) -> bool:
        return bool(state.get("abandoned")) or ref.task_id in self._abandoning

    async def status(self, principal: Principal, task_id: str) -> TaskView:
        ref = await self.tasks.locate(task_id)
        if ref is None or ref.tenant_id != principal.tenant_id:
            # Expired from Redis: the durable record answers. Another tenant's task is looked
            # for there too (the caller has no such row): answered from Redis alone, its 404
            # came sooner than an unknown id's (and a 404 where an unknown id got 503 while
            # PostgreSQL was down), which told that the id exists.
            return await self._persisted(principal, task_id)
        state = await self.tasks.read(ref)
        if state is None:
            return await self._persisted(principal, task_id)
        return TaskView(
            task_id=task_id,
            status=state.get("status") or TaskStatus.processing,
            created_at=state.get("created_at") or "",
            updated_at=state.get("updated_at") or "",
            session_id=ref.session_id,
            agent_id=state.get("agent_id"),
            attempt=int(state.get("attempt") or 1),
            result=_json_field(state, "result"),
            error=_json_field(state, "error"),
            usage=_json_field(state, "usage"),
        )

    async def _persisted(self, principal: Principal, task_id: str) -> TaskView:
        record = None
        if self.history is not None:
            record = await self.history.task(principal.tenant_id, task_id)
        if record is None:
            raise NotFound(f"task {task_id} not found")
        return msgspec.convert(record.to_status(), TaskView)

    async def cancel(
        self, principal: Principal, task_id: str, *, session_id: str | None = None
    ) -> Cancelled:
        """`session_id`: a socket's cancel, of its own session's tasks only (as its sends):
        a task of another session was cancelled and its `chat.cancelled` reached that
        session's sockets only, the asking socket heard nothing, ever."""
        ref = await self.tasks.locate(task_id)
        theirs = ref is not None and ref.tenant_id == principal.tenant_id
        if theirs and session_id is not None and ref is not None and ref.session_id != session_id:
            raise BadRequest(
                f"task {task_id} is of another session than this socket's: cancel it from a "
                "socket of its session, or by REST"
            )
        if ref is None or ref.tenant_id != principal.tenant_id:
            # Expired from Redis: a task the history knows is final, as `status` says (another
            # tenant's task is looked for there too, as in `status`: not found).
            view = await self._persisted(principal, task_id)
            raise Conflict(
                f"task {task_id} is already {view.status}", details={"status": view.status}
            )
        error = {"code": "cancelled", "message": "cancelled by client", "details": {}}
        outcome = await self.tasks.apply(
            ref,
            "cancel",
            body=events.event_body(events.CHAT_CANCELLED, {"status": "cancelled"}, task_id),
            fields={"status": TaskStatus.cancelled, "error": encode_json(error)},
        )
        assert outcome is not None
        if outcome.verdict is Verdict.unknown:
            raise NotFound(f"task {task_id} not found")
        if outcome.verdict is Verdict.final:
            if outcome.detail == TaskStatus.cancelled and await self.redis.set(
                keys.task_recancel(task_id), "1", nx=True, ex=RECANCEL_SECONDS
            ):
                # A retry of a cancel whose record or notice may not have gone out (the task
                # was marked, then the connection failed): both again, each taken once (the
                # writer keeps one record per task, the AES ignores a repeat). Once per
                # RECANCEL_SECONDS: a client repeating the cancel in a loop filled the cancel
                # stream every AES instance shares (its last 10 000 notices) with one task's.
                await self._publish_cancelled(ref, None)
                await self._notify_aes(ref)
            raise Conflict(
                f"task {task_id} is already {outcome.detail}", details={"status": outcome.detail}
            )
        metrics.tasks.labels("cancelled", outcome.tier or "unknown").inc()
        await self._publish_cancelled(ref, outcome.detail)
        await self._notify_aes(ref)
        return Cancelled(task_id=task_id, status=TaskStatus.cancelled)

    async def erase_session(self, tenant_id: str, session_id: str) -> int:
        """Erase the session's task states; returns how many. The AES of a task still running
        is told to stop (`chat.cancel`): nobody will take its answer. Its record (cancelled)
        counts its request in `/api/usage`, as a cancelled task's does; the writer keeps no
        history of it (the session's erasure is older than the task's record)."""
        erased = await self.tasks.erase_session(tenant_id, session_id)
        ended = [*erased.running, *erased.kept]  # kept: an earlier attempt failed part way
        if ended and self.settings.database_url:
            records = []
            for ref, state, _ in ended:
                try:
                    records.append(record_of_erased(ref, state))  # once per task: the writer
                except MalformedRecord as exc:
                    log.warning("no persistence record for task %s: %s", ref.task_id, exc.reason)
            async with self.redis.pipeline(transaction=False) as pipe:
                for record in records:
                    await publish_record(pipe, record, maxlen=self.settings.persist_stream_maxlen)
                await pipe.execute()
        for ref, state, ttl in ended:
            await self._tell_sockets_erased(ref, ttl)  # once: the session's dedupe mark
            # Counted with the mark that ends the task's follow-ups: an erasure cut before it
            # is finished, and counted, by the next (counted right after the erase script, a
            # cut between the two lost it for good).
            metrics.tasks.labels("cancelled", state.get("tier") or "unknown").inc()
            await self._notify_aes(ref, erased=True)  # and the stub marked told with it
        return erased.tasks

    async def _tell_sockets_erased(self, ref: TaskRef, stub_ttl: int) -> None:
        """`chat.cancelled` (reason `session_erased`) to the sockets open on the session: a
        task ended by the erasure got no final event, and a page showing its streamed answer
        waited for one for ever. Appended to the log and published, as every event, so the
        sockets' cursors stay in order; the caller deletes the log right after. Once per
        task: an erasure retried after it failed part way finds the task kept, and tells the
        sockets then if the first attempt did not get that far."""
        settings = self.settings
        tenant, session = ref.tenant_id, ref.session_id
        data = {"status": TaskStatus.cancelled, "reason": "session_erased"}
        await self.tasks.scripts.session_event(
            keys=[
                keys.session_dedupe(tenant, session, f"erased:{ref.task_id}"),
                keys.session_log(tenant, session),
            ],
            args=[
                events.event_body(events.CHAT_CANCELLED, data, ref.task_id),
                settings.session_log_maxlen,
                settings.session_log_ttl_seconds * 1000,
                keys.session_channel(tenant, session),
                # As long as the task's stub, which a retried erasure may find: told once.
                stub_ttl if stub_ttl > 0 else settings.task_ttl_seconds + MAX_TASK_TIMEOUT_SECONDS,
            ],
        )

    async def tell_sockets_session_erased(self, tenant: str, session: str) -> None:
        """`session.erased` to the sockets open on the session, last, before its log is
        deleted: a tab showing a finished conversation erased from another one kept showing
        it, told nothing (only a running task's `chat.cancelled` said so)."""
        settings = self.settings
        await self.tasks.scripts.session_event(
            keys=[
                keys.session_dedupe(tenant, session, "erased:session"),
                keys.session_log(tenant, session),
            ],
            args=[
                events.event_body(events.SESSION_ERASED, {"session_id": session}),
                settings.session_log_maxlen,
                settings.session_log_ttl_seconds * 1000,
                keys.session_channel(tenant, session),
                ERASED_SESSION_NOTICE_SECONDS,  # an erasure retried at once: told once
            ],
        )

    async def _publish_cancelled(self, ref: TaskRef, event_id: str | None) -> None:
        """The cancelled task's record for PostgreSQL (history is written when a task ends)."""
        if self.settings.database_url:
            await publish_finished(
                self.redis, [(ref, event_id)], maxlen=self.settings.persist_stream_maxlen
            )

    async def _notify_aes(self, ref: TaskRef, *, erased: bool = False) -> None:
        """`chat.cancel` on the cancel stream, and the task's deadline removed; for a task an
        erasure dropped, its stub marked told in the same round trip (a retried erasure
        sends nothing again, `TaskStore.queue_told`)."""
        task_id = ref.task_id
        with telemetry.producer(keys.CANCEL_STREAM, **{"orchestrator.task_id": task_id}) as span:
            notice = ChatCancel(
                tenant_id=ref.tenant_id,
                session_id=ref.session_id,
                task_id=task_id,
                trace_context=telemetry.inject(span),
            )
            # The deadline of a finished task has nothing left to time out.
            deadlines, member = self._deadlines(ref)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(
                    keys.CANCEL_STREAM,
                    {ACTION_FIELD: encode_action(notice)},
                    maxlen=keys.CANCEL_STREAM_MAXLEN,
                    approximate=True,
                )
                pipe.zrem(deadlines, member)
                if erased:
                    self.tasks.queue_told(pipe, ref)
                await pipe.execute()


def _json_field(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    raw = state.get(name)
    if not raw:
        return None
    value = _json_decoder.decode(raw)
    return value if isinstance(value, dict) else None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
