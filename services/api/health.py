"""Health endpoints: liveness, readiness (Redis up, not draining), details, socket stats."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from litestar import Request, get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.response import Response
from redis.exceptions import ResponseError

from services.api.chat import UNAUTHORIZED, WRONG_TENANT, AuthenticatedOperation
from services.api.models import refusal, refusals
from services.api.runtime import Runtime
from services.core import clock, keys
from services.core.auth import Principal
from services.core.errors import Unavailable
from services.core.redis_client import (
    NEEDED_POLICY,
    REDIS_DOWN,
    REDIS_REFUSING,
    eviction_policy,
    is_cluster,
)
from services.persistence.backlog import backlog as persistence_backlog
from services.persistence.database import database_state

AnyRequest = Request[Any, Any, Any]

# The write probe of /health/detailed: one short-lived key per pod (README, "Redis keys").
PROBE_KEY = "{health}:probe:"
PROBE_TTL_MS = 1000
PROBE_TAG_TRIES = 4096  # hash tags tried to find a slot on every primary (about 3 each)


@dataclass
class ProbeOperation(Operation):
    """A probe answers without a token (kubelet has none): `security: []` overrides the
    document's global bearer requirement, so that no SDK sends or demands one."""

    def __post_init__(self) -> None:
        self.security = []


def _runtime(request: AnyRequest) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


@get("/health", summary="Liveness", operation_class=ProbeOperation)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/health/ready",
    summary="Readiness: Redis answers, token keys are loaded and the pod is not draining",
    responses={
        503: refusal(
            503,
            "draining, Redis unreachable or refusing writes, no token key read yet, or this "
            "pod's CALLBACK_PARTITIONS not the installation's",
        )
    },
    operation_class=ProbeOperation,
)
async def ready(request: AnyRequest) -> Response[dict[str, Any]]:
    runtime = _runtime(request)
    if runtime.draining:
        return Response(Unavailable("draining").to_dict(), status_code=503)
    if not runtime.verifier.ready:  # no token could be verified: 503 for every client
        refused = Unavailable("the identity provider's signing keys are not read yet")
        return Response(refused.to_dict(), status_code=503)
    try:
        await runtime.redis.ping()
    except REDIS_DOWN:
        return Response(Unavailable("redis unavailable").to_dict(), status_code=503)
    except REDIS_REFUSING as exc:  # MISCONF: a failed snapshot makes Redis refuse PING too
        refused = Unavailable(f"redis refuses writes: {_reason(exc)}")
        return Response(refused.to_dict(), status_code=503)
    try:
        agree = await runtime.chat.partitions_agree()
    except (*REDIS_DOWN, *REDIS_REFUSING):
        return Response(Unavailable("redis unavailable").to_dict(), status_code=503)
    if not agree:
        refused = Unavailable(
            "misconfigured: this pod's CALLBACK_PARTITIONS is not the installation's (its log "
            "says which)"
        )
        return Response(refused.to_dict(), status_code=503)
    return Response({"status": "ready"}, status_code=200)


async def _queue_lag(runtime: Runtime) -> dict[str, Any]:
    """Every AES and callback stream's groups, asked at once: one after the other, a Redis
    answering in a second made this ~11 s alone."""
    streams = [keys.aes_stream(p) for p in keys.PRIORITIES] + [
        keys.callback_stream(n) for n in range(runtime.settings.callback_partitions)
    ]
    lag: dict[str, Any] = {}
    found = await asyncio.gather(*(_groups(runtime.redis, stream) for stream in streams))
    waiting: list[tuple[str, str, Any]] = []
    for stream, groups in zip(streams, found, strict=True):
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            lag[f"{stream}/{name}"] = {"lag": group.get("lag"), "pending": group.get("pending")}
            if group.get("lag") != 0:  # (None: Redis cannot tell, entries were deleted)
                waiting.append((f"{stream}/{name}", stream, group["last-delivered-id"]))
    ages = await asyncio.gather(
        *(_oldest_waiting(runtime.redis, stream, after) for _, stream, after in waiting)
    )
    for (where, _, _), age in zip(waiting, ages, strict=True):
        lag[where]["oldest_waiting_seconds"] = age
    return lag


async def _oldest_waiting(redis: Any, stream: str, delivered: bytes | str) -> float | None:
    """How long the oldest entry no consumer of the group has read yet has been waiting (its
    id's time, on Redis's clock): under overload a saturated AES and a dead one both show a
    lag; the age tells how long messages wait, and whether it grows."""
    after = delivered.decode() if isinstance(delivered, bytes) else delivered
    entries = await redis.xrange(stream, min=f"({after}", max="+", count=1)
    if not entries:
        return None
    entry_id = entries[0][0]
    added_ms = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
    return round(max(0.0, clock.now() - added_ms / 1000), 3)


async def _groups(redis: Any, stream: str) -> list[dict[str, Any]]:
    try:
        groups: list[dict[str, Any]] = await redis.xinfo_groups(stream)
    except ResponseError as exc:
        if isinstance(exc, REDIS_REFUSING):
            raise
        return []  # the stream does not exist yet
    return groups


async def _live_workers(runtime: Runtime) -> dict[str, int]:
    """Live as the workers themselves count: a worker silent for a lease has lost its leases
    (`Leases.live_workers`). Three leases showed a killed last worker as alive for 30 s,
    exactly when an operator looks because nothing is consumed."""
    now = clock.now()  # the workers' heartbeats are on Redis's clock
    workers = await runtime.redis.zrangebyscore(
        keys.WORKER_HEARTBEATS, now - runtime.settings.partition_lease_seconds, "+inf"
    )
    return {"alive": len(workers)}


async def _database(runtime: Runtime) -> dict[str, Any]:
    """PostgreSQL is not on the message path: its state is reported, never a reason to fail
    readiness (the backlog waits in Redis until it is back)."""
    if runtime.database is None:
        return {"status": "not_configured"}
    return await database_state(runtime.database)


def _reason(exc: Exception) -> str:
    """Redis's refusal with its code (`OOM ...`): redis-py strips the code it recognised."""
    text, code = str(exc), getattr(exc, "status_code", None)
    return f"{code} {text}" if code and not text.startswith(code) else text


def _probe_keys(redis: Any, pod_id: str) -> list[str]:
    """One probe key on each primary: on a cluster, one key wrote to one node of three, and
    another node refusing writes (NOREPLICAS) went unseen while its sessions' sends got 503."""
    if not is_cluster(redis):
        return [PROBE_KEY + pod_id]
    probes: dict[str, str] = {}
    primaries = {node.name for node in redis.get_primaries()}
    for tag in range(PROBE_TAG_TRIES):
        key = f"{{health:{tag}}}:probe:{pod_id}"
        node = redis.get_node_from_key(key)
        if node is not None and node.name in primaries:
            probes.setdefault(node.name, key)
        if len(probes) == len(primaries):
            break
    return list(probes.values())


async def _redis_state(runtime: Runtime) -> dict[str, Any]:
    """Whether Redis answers and accepts writes, and its eviction policy.

    A PING alone said "up" while Redis refused every write (out of memory, a failed snapshot,
    no replica in sync): the one probe that tells is a write, here a SET of a key that expires
    by itself. PING, the probe and CONFIG GET go at once: about one round trip in all.
    """
    timed, probed, policy = await asyncio.gather(
        _timed_ping(runtime.redis),
        _probe_writes(runtime.redis, runtime.pod_id),
        eviction_policy(runtime.redis),
        return_exceptions=True,
    )
    _raise_unless_refusing(timed, probed, policy)
    refusal = next((r for r in (timed, probed) if isinstance(r, BaseException)), None)
    state: dict[str, Any]
    if refusal is not None:
        state = {"status": "refusing_writes", "reason": _reason(refusal)}  # type: ignore[arg-type]
    else:
        state = {"status": "up", "latency_ms": timed}
    state["maxmemory_policy"] = policy
    if policy is not None and policy != NEEDED_POLICY:
        state["warning"] = f"maxmemory-policy {policy} evicts the service's keys when full"
    return state


def _raise_unless_refusing(*results: object) -> None:
    """Re-raise the first failure that is not Redis refusing writes (down, or a bug)."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, REDIS_REFUSING):
            raise result


async def _timed_ping(redis: Any) -> float:
    started = time.perf_counter()
    await redis.ping()
    return round((time.perf_counter() - started) * 1000, 3)


async def _probe_writes(redis: Any, pod_id: str) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for key in _probe_keys(redis, pod_id):
            pipe.set(key, b"1", px=PROBE_TTL_MS)
        await pipe.execute()


async def _redis_components(runtime: Runtime) -> dict[str, Any]:
    """Redis's state, the live workers and the queues, asked at once: one after the other,
    ~15 round trips made the answer take 20 s when Redis answered in 1.4 s (a monitoring
    probe then timed out and took the api for down, exactly when an operator looks). The
    first failure in this order is raised, as when they ran one after the other."""
    parts = [
        asyncio.ensure_future(_redis_state(runtime)),
        asyncio.ensure_future(_live_workers(runtime)),
        asyncio.ensure_future(_queue_lag(runtime)),
    ]
    try:
        state, workers, queues = [await part for part in parts]
    finally:
        for part in parts:
            part.cancel()
            if part.done() and not part.cancelled():
                part.exception()  # retrieved: a sibling's failure is the one reported
    return {"redis": state, "workers": workers, "queues": queues}


async def _backlog(runtime: Runtime) -> int | None:
    try:
        return await persistence_backlog(runtime.redis)
    except (*REDIS_DOWN, *REDIS_REFUSING):
        return None


@get(
    "/health/detailed",
    summary="Component states: redis, workers, queue lag",
    responses={
        503: ResponseSpec(
            dict[str, Any],
            generate_examples=False,
            description='`{"status": "degraded", "components"}`: draining, or Redis '
            "down or refusing writes (PostgreSQL's state is reported, never a reason)",
        )
    },
    operation_class=ProbeOperation,
)
async def detailed(request: AnyRequest) -> Response[dict[str, Any]]:
    """Unauthenticated and a dozen Redis commands or more (a write among them): calls that
    come while one is answered share its answer (SingleFlight)."""
    runtime = _runtime(request)
    body, status = await runtime.detailed_health.run(lambda: _detailed(runtime))
    return Response(body, status_code=status)


async def _detailed(runtime: Runtime) -> tuple[dict[str, Any], int]:
    components: dict[str, Any] = {"pod": runtime.pod_id, "draining": runtime.draining}
    healthy = not runtime.draining
    with_database = runtime.database is not None
    found, database, backlog = await asyncio.gather(
        _redis_components(runtime),
        _database(runtime),
        _backlog(runtime) if with_database else asyncio.sleep(0),
        return_exceptions=True,
    )
    if isinstance(found, REDIS_DOWN):
        healthy = False
        components["redis"] = {"status": "down"}
    elif isinstance(found, REDIS_REFUSING):  # a read refused too (MISCONF refuses PING too)
        healthy = False
        components["redis"] = {"status": "refusing_writes", "reason": _reason(found)}
    elif isinstance(found, BaseException):
        raise found
    else:
        components.update(found)
        healthy = healthy and found["redis"]["status"] == "up"
    for part in (database, backlog):
        if isinstance(part, BaseException):
            raise part
    components["database"] = database
    if with_database:
        components["persistence_backlog"] = backlog
    components["websockets"] = {"connections": runtime.hub.count()}
    mismatch = runtime.chat.partition_mismatch  # found by a send or the readiness probe
    if mismatch is not None:
        healthy = False
        components["callback_partitions"] = {
            "status": "mismatch",
            "configured": mismatch.count,
            "recorded": int(mismatch.recorded)
            if mismatch.recorded.isdigit()
            else mismatch.recorded,
        }
    body = {"status": "ok" if healthy else "degraded", "components": components}
    return body, 200 if healthy else 503


@get(
    "/ws/stats",
    summary="Sockets on this pod: totals and the caller's tenant",
    responses=refusals({401: UNAUTHORIZED, 403: WRONG_TENANT}),
    operation_class=AuthenticatedOperation,
)
async def socket_stats(
    request: AnyRequest, principal: NamedDependency[Principal]
) -> dict[str, Any]:
    """Other tenants' counts are not shown to a tenant; SREs read them from the metrics."""
    runtime = _runtime(request)
    per_tenant = runtime.hub.per_tenant()
    return {
        "pod": runtime.pod_id,
        "connections": runtime.hub.count(),
        "max_connections": runtime.settings.max_websocket_connections,
        "sessions": runtime.hub.session_count(),
        "tenants": {principal.tenant_id: per_tenant.get(principal.tenant_id, 0)},
    }
