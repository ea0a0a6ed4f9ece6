"""The VALUES of the `orchestrator_*` metrics against what happened, on real processes (api and
worker on Valkey and PostgreSQL; the test answers as an external AES, so timing is exact)."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.e2e.clients import auth, connect, events_until, final_of, unique
from tests.e2e.external_aes import Aes
from tests.e2e.test_erasure_usage import callback_consumed
from tests.e2e.test_external_aes import start_task
from tests.e2e.test_metrics import scrape, total

pytestmark = pytest.mark.e2e


async def test_a_task_ended_by_erasing_its_session_is_counted_as_cancelled(
    aes_less_stack: tuple[LocalStack, Child, Child],
) -> None:
    """`DELETE /api/sessions/{id}` ends a running task as cancelled (its record says so, a late
    completion is dropped as final): `orchestrator_tasks_total{status="cancelled"}` must count
    it, or an accepted task never reaches any final status on the dashboard."""
    stack, api, worker = aes_less_stack
    redis = Redis.from_url(stack.env["ORCHESTRATOR_REDIS_URL"])
    aes = Aes(redis, "aes-m1")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    before_api = scrape(api.metrics_port)
    before_worker = scrape(worker.metrics_port)
    task = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        erased = await http.delete(f"/api/sessions/{session}", headers=auth(tenant))
        assert erased.status_code == 200, erased.text
    done = await aes.answer(action, {"action_type": "execution.completed", "content": "late"})
    await aes.ack(stream, entry)
    await callback_consumed(redis, action["callback_queue"], done)
    await redis.aclose()
    after_api = scrape(api.metrics_port)
    after_worker = scrape(worker.metrics_port)

    def delta(after: dict, before: dict, status: str) -> float:  # type: ignore[type-arg]
        name = "orchestrator_tasks_total"
        return total(after, name, status=status) - total(before, name, status=status)

    assert delta(after_worker, before_worker, "completed") == 0  # the late one is not counted
    ended = {
        status: delta(after_api, before_api, status) + delta(after_worker, before_worker, status)
        for status in ("completed", "failed", "cancelled", "timed_out")
    }
    assert ended["cancelled"] == 1, (
        f"one accepted task ended (cancelled by the session's erasure); final statuses counted "
        f"across api and worker: {ended}"
    )


async def test_time_to_first_chunk_is_observed_once_for_a_retried_task(
    aes_less_stack: tuple[LocalStack, Child, Child],
) -> None:
    """The first attempt streams a chunk and fails (retryable); the second streams and
    completes. One task, one answer: `orchestrator_time_to_first_chunk_seconds` (DESIGN §7: "time
    to first chunk") observes it once, the time the client saw its first chunk."""
    stack, api, worker = aes_less_stack
    redis = Redis.from_url(stack.env["ORCHESTRATOR_REDIS_URL"])
    aes = Aes(redis, "aes-m2")
    await aes.ensure_group()
    tenant, session = unique("t"), unique("s")
    name = "orchestrator_time_to_first_chunk_seconds_count"
    before = total(scrape(worker.metrics_port), name)
    answers_before = total(scrape(worker.metrics_port), "orchestrator_answer_seconds_count")
    ws, _ = await connect(api.ws_url, tenant, session)
    task = await start_task(api, tenant, session)
    stream, entry, action = await aes.take(task)
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "first "})
    await aes.answer(
        action,
        {"action_type": "execution.failed", "error": "upstream 503", "retryable": True},
    )
    await aes.ack(stream, entry)
    stream, entry, action = await aes.take(task)
    assert action["attempt"] == 2
    await aes.answer(action, {"action_type": "execution.chunk", "seq": 1, "delta": "again "})
    done = await aes.answer(action, {"action_type": "execution.completed", "content": "done"})
    await aes.ack(stream, entry)
    await events_until(ws, final_of(task))
    await ws.close()
    await callback_consumed(redis, action["callback_queue"], done)
    await redis.aclose()
    after = scrape(worker.metrics_port)
    assert total(after, "orchestrator_answer_seconds_count") - answers_before == 1
    assert total(after, name) - before == 1, (
        f"one task: time to first chunk observed {total(after, name) - before} times"
    )


async def test_queue_wait_is_observed_once_per_task_not_per_attempt(
    own_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A task whose first attempt fails (retryable) and second completes waited in the queue
    once, a few ms. The reference executor observes `orchestrator_queue_wait_seconds` again for
    the retry, timed from the message's acceptance: the first attempt's run and the retry
    backoff show up as queue wait (the histogram counts 2 for one task, the sum holds the
    backoff)."""
    from tests.e2e.conftest import deploy

    backoff = 1.0
    with deploy(
        own_redis,
        tmp_path_factory.mktemp("qw-logs"),
        executor_chunk_delay_ms="1",
        retry_backoff_seconds=str(backoff),
        retry_backoff_max_seconds=str(backoff),
    ) as deployed:
        api = deployed.api
        executor = next(c for c in deployed.stack.children if c.role == "executor")
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            reply = await http.post(
                "/api/chat/send",
                json={
                    "message": "retry me",
                    "session_id": session,
                    "context": {"simulate": {"fail_attempts": 1}},
                },
                headers=auth(tenant),
            )
            assert reply.status_code == 202, reply.text
        final = (await events_until(ws, final_of(reply.json()["task_id"])))[-1]
        await ws.close()
        assert final["type"] == "chat.response", final
        samples = scrape(executor.metrics_port)
        assert total(samples, "orchestrator_executor_tasks_total", outcome="completed") == 1
        count = total(samples, "orchestrator_queue_wait_seconds_count")
        waited = total(samples, "orchestrator_queue_wait_seconds_sum")
        assert (count, waited < backoff) == (1, True), (
            f"one task, queued once: queue wait observed {count} times, {waited:.3f} s in all "
            f"(retry backoff {backoff} s)"
        )
