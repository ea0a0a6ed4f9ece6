"""A send with an `Idempotency-Key` cut by a cancel (uvicorn cancels request handlers still
running when `timeout_graceful_shutdown` ends, at every api pod's SIGTERM/rollout) between its
two round trips: the limits were taken, the task was never enqueued. README: "Retrying the
same message? Pass the same key: the send is enqueued once" and "A key whose task was never
queued (its request failed after reserving it) is taken over by the next request with it".

Real Redis, the real ChatService (tests/integration/test_send_step.py's `service` fixture);
the cancel is the one uvicorn would deliver, at successive points of the send. Found by the
cancellation review.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from services.api.chat_service import SendAttempt
from services.api.models import SendRequest
from services.core import keys
from services.core.errors import RateLimited
from tests.integration.test_send_step import (  # noqa: F401  (the fixture)
    PRINCIPAL,
    Service,
    service,
)


async def _queued(svc: Service, session: str) -> int:
    count = 0
    for priority in keys.PRIORITIES:
        count += sum(1 for action in await svc.actions(priority) if f'"{session}"' in action)
    return count


async def test_a_retry_of_a_send_cut_by_a_cancel_is_accepted_once(
    service: Service,  # noqa: F811  (the fixture imported above)
) -> None:
    """A send cut (the api pod stopping under it) is retried with the same Idempotency-Key
    and accepted: one message, one task, one slot of the session's rate limit. It was refused
    429 after waiting 4 s (IN_FLIGHT_SECONDS) for a task never queued: the cut attempt had
    reserved the key and taken the limit, with no cleanup for a cancel in between."""
    await service.tier("pro", {"requestsPerMinutePerSession": 1})
    for step in range(0, 60):
        session, key = f"s{step}", f"k{step}"
        first = asyncio.create_task(service.send(session, key))
        for _ in range(step):  # the cancel lands at a later point of the send each time
            await asyncio.sleep(0)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        started = time.monotonic()
        try:
            task_id = await service.send(session, key)
        except RateLimited as refused:
            took = time.monotonic() - started
            raise AssertionError(
                f"cancel after {step} loop steps: nothing queued for the session, yet its "
                f"retry with the same Idempotency-Key was refused after {took:.1f} s: "
                f"{refused!r}"
            ) from None
        assert task_id
        assert await _queued(service, session) == 1


async def test_a_send_cut_by_the_shutdown_is_queued_before_redis_is_closed(
    service: Service,  # noqa: F811  (the fixture imported above)
) -> None:
    """A send cut by uvicorn's shutdown is answered 503 "the message may still be queued as
    task X" (its steps run on, see `ChatService.send`). The lifespan then stops the chat
    service and closes Redis: X must be queued by then, as the answer let the client expect.
    Closing Redis right after the cut broke the steps off between their round trips: the key
    named a task that never came, and the message was lost unless the client resent it."""
    await service.tier("pro")
    await service.send("warm")  # the tenant's quota is cached from here on
    cut_in_steps = 0
    for step in range(0, 40):
        session, key = f"s{step}", f"k{step}"
        attempt = SendAttempt()
        first = asyncio.create_task(
            service.chat.send(
                PRINCIPAL,
                SendRequest(message="hello"),
                session_id=session,
                agent_id="default",
                idempotency_key=key,
                attempt=attempt,
            )
        )
        for _ in range(step):  # the cancel lands at a later point of the send each time
            await asyncio.sleep(0)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await service.chat.stop()  # what the lifespan does before closing Redis
        await service.redis.connection_pool.disconnect()  # the close, under anything in flight
        if attempt.task_id is None:
            continue  # cut before a task was chosen: nothing of it may be queued
        if not first.cancelled():
            continue  # it finished before the cancel reached it
        cut_in_steps += 1
        assert await _queued(service, session) == 1, (
            f"cancel after {step} loop steps: task {attempt.task_id} was never queued"
        )
    assert cut_in_steps, "no cancel landed while the send's steps ran"
