"""The product on a real 3-master Redis Cluster (the session's `redis_cluster`), under faults
and under the microscope.

- A full run under `MONITOR` on every node: every command and every script stayed on one slot,
  every key the product wrote has a documented hash tag, no process logged a refusal.
- Callback streams live on more than one node.
- A node killed and restarted mid-run: every process recovers by itself, every answer arrives
  exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import pytest
from redis.crc import key_slot

from services.cli.embedded import LocalCluster
from services.cli.embedded_postgres import PostgresServer
from services.cli.stack import LocalStack
from services.core import keys
from services.core.actions import ACTION_FIELD, WebsocketBroadcast, WebsocketSend, encode_action
from services.core.quotas import QuotaStore
from services.core.settings import load_settings
from services.persistence.migrate import migrate
from tests.e2e.clients import auth, connect, events_until, final_of, send, unique
from tests.e2e.conftest import FAST_EXECUTOR, new_stack, redis_client, redis_env
from tests.e2e.failover import Conversation, converse
from tests.e2e.monitor import Monitor, family, shape

pytestmark = pytest.mark.e2e

REFUSALS = ("CROSSSLOT", "non local key", "same key slot", "Traceback")


def refusals(stack: LocalStack) -> list[str]:
    """Log lines of any child that show a refused command or an unexpected exception."""
    found = []
    for child in stack.children:
        if child.log_path is not None:
            text = child.log_path.read_text(errors="replace")
            found += [f"{child.role}: {line[:300]}" for line in text.splitlines()
                      if any(word in line for word in REFUSALS)]  # fmt: skip
    return found


async def orchestrator(cluster: LocalCluster, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli.main", *args,
        env={"PATH": os.environ.get("PATH", ""), **redis_env(cluster)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode(), err.decode()


async def full_run(cluster: LocalCluster, stack: LocalStack, database_url: str) -> None:
    """Every feature that touches Redis, once: the workload of the key audit."""
    apis = [stack.start_api(), stack.start_api()]
    stack.start("worker")
    stack.start("worker")
    stack.start("executor")
    stack.wait_ready(*apis)
    redis = redis_client(cluster)
    store = QuotaStore(redis, load_settings())
    tenant, strict = unique("t"), unique("t")
    await store.set(strict, "pro", {"requestsPerMinutePerSession": 2, "taskTimeoutSeconds": 1})
    code, _, err = await orchestrator(cluster, "tenants", "set", tenant, "--tier", "enterprise")
    assert code == 0, err
    sessions = [unique("s") for _ in range(16)]
    sockets = [
        (await connect(apis[n % 2].ws_url, tenant, session))[0]
        for n, session in enumerate(sessions)
    ]
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            # Streamed and plain answers on 16 sessions at once, over both apis.
            replies = await asyncio.gather(*(
                send(http, apis[n % 2].url, tenant,
                     {"message": f"m{n}", "stream": n % 4 != 0, "session_id": session})
                for n, session in enumerate(sessions)
            ))  # fmt: skip
            for ws, reply in zip(sockets, replies, strict=True):
                assert reply.status_code == 202, reply.text
                await events_until(ws, final_of(reply.json()["task_id"]))
            # A chat.send on a socket, with an idempotency key repeated over REST.
            await sockets[0].send(json.dumps({"type": "chat.send", "data": {"message": "ws"}}))
            status = await events_until(sockets[0], lambda e: e["type"] == "chat.status")
            await events_until(sockets[0], final_of(status[-1]["task_id"]))
            body = {"message": "once", "session_id": sessions[1]}
            first = await send(http, apis[0].url, tenant, body, **{"Idempotency-Key": "k"})
            again = await send(http, apis[1].url, tenant, body, **{"Idempotency-Key": "k"})
            assert first.json()["task_id"] == again.json()["task_id"]
            await events_until(sockets[1], final_of(first.json()["task_id"]))
            # A cancel mid-stream, and a retried failure.
            slow = {"simulate": {"chunk_delay_ms": 30, "repeat": 10}}
            reply = await send(http, apis[0].url, tenant,
                               {"message": "long", "stream": True, "session_id": sessions[2],
                                "context": slow})  # fmt: skip
            task_id = reply.json()["task_id"]
            await events_until(sockets[2], lambda e: e["type"] == "chat.chunk")
            cancel = await http.post(f"{apis[1].url}/api/chat/cancel", json={"task_id": task_id},
                                     headers=auth(tenant))  # fmt: skip
            assert cancel.status_code == 200
            await events_until(sockets[2], final_of(task_id))
            flaky = {"simulate": {"fail_attempts": 1}}
            reply = await send(http, apis[1].url, tenant,
                               {"message": "retried", "session_id": sessions[3],
                                "context": flaky})  # fmt: skip
            events = await events_until(sockets[3], final_of(reply.json()["task_id"]))
            assert events[-1]["type"] == "chat.response"
            # A timeout, and the session rate limit of the strict tenant.
            session = unique("s")
            ws, _ = await connect(apis[0].ws_url, strict, session)
            stalled = {"message": "stall", "session_id": session,
                       "context": {"simulate": {"stall": True}}}  # fmt: skip
            reply = await send(http, apis[0].url, strict, stalled)
            events = await events_until(ws, final_of(reply.json()["task_id"]), timeout=15)
            assert events[-1]["data"]["code"] == "timed_out"
            assert (await send(http, apis[1].url, strict, {"message": "2", "session_id": session})
                    ).status_code == 202  # fmt: skip
            refused = await send(http, apis[0].url, strict, {"message": "3", "session_id": session})
            assert refused.status_code == 429
            await ws.close()
            # The AES's own messages, and a malformed callback (dead-lettered).
            for n, action in enumerate((
                WebsocketSend(tenant_id=tenant, session_id=sessions[4], message={"hi": 1}),
                WebsocketBroadcast(tenant_id=tenant, session_id=sessions[4], message={"all": 1}),
            )):  # fmt: skip
                stream = keys.callback_stream(keys.partition_of(tenant, sessions[4], 8))
                await redis.xadd(stream, {ACTION_FIELD: encode_action(action)})
                await events_until(sockets[4], lambda e, n=n: e["type"] == "message")
            await redis.xadd(keys.callback_stream(5), {ACTION_FIELD: b"{not json"})
            # A resume from the first event of a session.
            resumed, ack = await connect(apis[1].ws_url, tenant, sessions[5], last_event_id="0-0")
            assert ack["data"]["resumed"] is True
            await resumed.close()
            # History and usage (PostgreSQL, fed through the persistence stream).
            deadline = time.monotonic() + 20
            while True:
                page = await http.get(f"{apis[0].url}/api/sessions/{sessions[6]}/messages",
                                      headers=auth(tenant))  # fmt: skip
                if page.status_code == 200 and page.json()["messages"]:
                    break
                assert time.monotonic() < deadline, page.text
                await asyncio.sleep(0.1)
            usage = await http.get(f"{apis[1].url}/api/usage", headers=auth(tenant))
            assert usage.status_code == 200
        code, out, err = await orchestrator(cluster, "deadletters", "list", "--json")
        assert code == 0, err
        assert any(letter["reason"].startswith("malformed") for letter in json.loads(out))
        code, out, err = await orchestrator(cluster, "tenants", "list")
        assert code == 0, err
        assert tenant in out
    finally:
        for ws in sockets:
            await ws.close()
        await redis.aclose()


async def test_every_command_and_script_of_a_full_run_stays_on_one_slot(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    monitor = Monitor(redis_cluster, tmp_path / "monitor")
    postgres = PostgresServer(durable=False).start()
    stack = new_stack(
        redis_cluster, tmp_path / "logs", database_url=postgres.url(), **FAST_EXECUTOR
    )
    try:
        await migrate(postgres.url())
        deadline = time.monotonic() + 10
        while not monitor.ready():
            assert time.monotonic() < deadline, "MONITOR did not start"
            await asyncio.sleep(0.02)
        await full_run(redis_cluster, stack, postgres.url())
        stack.check_alive()
        refused = refusals(stack)
    finally:
        stack.stop()
        commands = monitor.stop()
        postgres.cleanup()
    assert refused == [], refused

    product = [c for c in commands if c.name not in ("MONITOR", "CLUSTER", "INFO", "PING")]
    assert len(product) > 1000, "MONITOR saw the run"
    crossing = [c.args for c in product if len(c.slots()) > 1]
    assert crossing == [], crossing[:5]
    scripts = [c for c in product if c.name in ("EVALSHA", "EVAL")]
    assert sum(bool(c.inner) for c in scripts) > 100, "scripts ran, with their own commands"
    written: dict[str, set[str]] = defaultdict(set)
    for command in product:
        for one in (command, *command.inner):
            if one.name in WRITES_SEEN:
                for key in one.key_names():
                    written[shape(key)].add(key)
    strays = sorted(shape_ for shape_, names in written.items()
                    if any(family(name) is None for name in names))  # fmt: skip
    assert strays == [], strays
    assert {family(next(iter(names))) for names in written.values()} >= {
        "session", "task location", "tenant", "aes contract", "callback partition",
        "dead letters", "workers", "quota index", "persistence",
    }  # fmt: skip
    streams_on = {c.node for c in product if c.name == "XADD" and c.args[1].startswith("{cb:")}
    assert len(streams_on) > 1, "callbacks were written on more than one node"
    by_command = Counter(c.name for c in product)
    top = by_command.most_common(8)
    print(f"\n{len(product)} commands on {len(redis_cluster.ports)} nodes (callbacks written "
          f"on {len(streams_on)}), "
          f"{len(scripts)} scripts, none across slots; top: {top}")  # fmt: skip
    for key_shape in sorted(written):
        print(f"  {family(next(iter(written[key_shape])))}: {key_shape}")


WRITES_SEEN = {
    "SET", "HSET", "HINCRBY", "HINCRBYFLOAT", "XADD", "XACK", "XDEL", "XGROUP", "XCLAIM",
    "XAUTOCLAIM", "XREADGROUP", "ZADD", "ZREM", "ZREMRANGEBYSCORE", "SADD", "SREM", "EXPIRE",
    "PEXPIRE", "DEL", "SPUBLISH",
}  # fmt: skip


def test_callback_partitions_spread_over_the_primaries(redis_cluster: LocalCluster) -> None:
    """8 partitions over 3 primaries: each stream's hash tag picks its slot, hence its node
    (the full run above shows the streams written on more than one node)."""
    placement = Counter(
        redis_cluster.node_of_slot(key_slot(keys.callback_stream(n).encode())).port
        for n in range(8)
    )
    assert len(placement) == 3, placement
    print(f"\ncallback partitions per node: {sorted(placement.values())}")


async def test_a_node_restarted_mid_run_is_rejoined_by_every_process_by_itself(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    """SIGKILL the node that serves the AES streams while 16 sessions stream their answers,
    restart it on its port (its append-only file keeps the data): no process is restarted,
    every answer arrives exactly once."""
    stack = new_stack(
        redis_cluster,
        tmp_path / "logs",
        executor_chunk_delay_ms="15",
        executor_reclaim_idle_seconds="2",
        partition_lease_seconds="3",
    )
    try:
        apis = [stack.start_api(), stack.start_api()]
        stack.start("worker")
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(*apis)
        pids = [child.process.pid for child in stack.children]
        victim = redis_cluster.node_of_slot(key_slot(keys.aes_stream("normal").encode()))
        conversations = [
            Conversation(apis, f"t{n % 4}-{unique('c')}", unique("s"), {"repeat": 3})
            for n in range(16)
        ]
        restarted: dict[str, float] = {}

        async def kill_and_restart() -> None:
            started = time.monotonic()
            redis_cluster.kill(victim)
            noticed = time.monotonic() + 10
            while not any(c.notices["unavailable"] or c.refused for c in conversations):
                if time.monotonic() > noticed:
                    break
                await asyncio.sleep(0.02)
            restarted["down"] = time.monotonic() - started
            await asyncio.to_thread(redis_cluster.restart, victim)
            restarted["back"] = time.monotonic() - started

        result, _ = await converse(
            conversations, 5, fault=kill_and_restart, fault_after_answers=20, answer_timeout=30
        )
        print(f"\ncluster node restart (down {restarted['down']:.2f} s, cluster ok again "
              f"after {restarted['back']:.2f} s): {result.line()}")  # fmt: skip
        assert [child.process.pid for child in stack.children] == pids
        stack.check_alive()
        assert result.errors == [], result.errors[:5]
        assert (result.lost, result.duplicated, result.same_id_twice) == (0, 0, 0)
        assert result.resume_gaps == 0, "the restarted node kept its data (append-only file)"
        assert result.completed == result.messages == 80
        assert result.recovered_after is not None
        assert result.recovered_after < 30
        assert refusals(stack) == []
    finally:
        stack.stop()
        if not victim.alive():
            redis_cluster.restart(victim)


async def test_a_session_whose_slot_moves_to_another_node_keeps_its_socket_fed(
    redis_cluster: LocalCluster, tmp_path: Path
) -> None:
    """Live resharding: the node that gave up the session's slot unsubscribes the channel
    (`sunsubscribe`); the api subscribes it again on the new owner and the socket gets every
    event of the next answer, nothing twice, without reconnecting."""
    stack = new_stack(redis_cluster, tmp_path / "logs", **FAST_EXECUTOR)
    try:
        api = stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(api)
        tenant, session = unique("t"), unique("s")
        ws, _ = await connect(api.ws_url, tenant, session)
        async with httpx.AsyncClient(timeout=15) as http:
            body = {"message": "before", "stream": True, "session_id": session}
            reply = await send(http, api.url, tenant, body)
            await events_until(ws, final_of(reply.json()["task_id"]))
            slot = key_slot(keys.session_channel(tenant, session).encode())
            source = redis_cluster.node_of_slot(slot)
            target = next(
                node for node in redis_cluster.nodes[: redis_cluster.masters] if node is not source
            )
            await asyncio.to_thread(redis_cluster.move_slot, slot, target)
            assert redis_cluster.node_of_slot(slot) is target
            reply = await send(http, api.url, tenant, {**body, "message": "after"})
            assert reply.status_code == 202, reply.text
            events = await events_until(ws, final_of(reply.json()["task_id"]), timeout=20)
        await ws.close()
        mine = [e for e in events if e.get("task_id") == reply.json()["task_id"]]
        ids = [e["id"] for e in mine]
        assert len(ids) == len(set(ids)), ids
        assert mine[-1]["type"] == "chat.response"
        assert mine[-1]["data"]["content"].endswith("after")
        seqs = [e["data"]["seq"] for e in mine if e["type"] == "chat.chunk"]
        assert seqs, mine
        assert seqs == list(range(1, len(seqs) + 1)), seqs
        log = stack.children[0].log_path
        assert log is not None
        assert "unsubscribed by its node" in log.read_text()
        assert refusals(stack) == []
    finally:
        stack.stop()
