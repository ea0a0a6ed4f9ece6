"""Failover figures: what clients see when Redis loses a node mid-stream.

Three scenarios, each on its own local deployment (two apis, two workers, one executor) with
16 sessions streaming 5 answers each (the fault strikes after 16 answers):

- `sentinel`: SIGKILL the primary; the sentinels promote the replica.
- `sentinel-lagging`: the same, but the replica is frozen (SIGSTOP) and the replication link
  filled with junk first, so the product's writes of the last `--lag-ms` before the kill never
  leave the primary: the promoted replica lacks them. This is what asynchronous replication
  can lose; a healthy link on one machine is less than a millisecond behind, and the loss
  could not be produced here any other way (a cut link resynchronizes within milliseconds).
- `cluster-restart`: SIGKILL the node of a 3-master cluster that serves the AES streams and
  restart it on its port (append-only file: its data survives).
- `cluster-failover`: a 3-master cluster with one replica each; SIGKILL the primary of the AES
  streams and leave it down: its replica is promoted (after `cluster-node-timeout`, 5 s) and
  every process follows the new slot map.

Printed per scenario: messages answered / failed / unfinished, client events sent (what the
answers consist of), received, lost, duplicated, and the seconds from the fault until a new
message was answered. Run: `python bench/failover.py [--scenarios ...] [--lag-ms 300]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from redis.crc import key_slot

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.cli.embedded import LocalCluster, LocalRedis, LocalSentinel, _command
from services.core import keys
from tests.e2e.clients import unique
from tests.e2e.conftest import new_stack
from tests.e2e.failover import Conversation, Tally, converse

SESSIONS = 16
JUNK_MB = 24
MESSAGES = 5


async def run(redis: LocalRedis, scenario: str, lag_ms: int) -> tuple[Tally, dict[str, float]]:
    logs = Path(tempfile.mkdtemp(prefix=f"failover-{scenario}-"))
    stack = new_stack(
        redis, logs, executor_chunk_delay_ms="15", executor_reclaim_idle_seconds="2",
        partition_lease_seconds="3", log_level="WARNING",
    )  # fmt: skip
    figures: dict[str, float] = {}
    try:
        apis = [stack.start_api(), stack.start_api()]
        stack.start("worker")
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(*apis)
        conversations = [
            Conversation(apis, f"t{n % 4}-{unique('f')}", unique("s"), {"repeat": 3})
            for n in range(SESSIONS)
        ]

        async def fault() -> float:
            started = time.monotonic()
            if isinstance(redis, LocalSentinel):
                old = redis.master_port()
                replica = redis.replica if redis.replica.port != old else redis.primary
                if scenario == "sentinel-lagging":
                    # Freeze the replica and fill the replication link (socket buffers included)
                    # with junk, so that whatever the product writes next waits in the
                    # primary's memory; the primary dies with it.
                    assert replica.process is not None
                    os.kill(replica.process.pid, signal.SIGSTOP)
                    for n in range(JUNK_MB):
                        _command(old, "SET", f"{{junk}}:{n}", "x" * 1_000_000)
                    await asyncio.sleep(lag_ms / 1000)
                    primary = _command(old, "INFO", "replication")
                    link = primary.get("slave0", {})
                    figures["replica behind by (bytes)"] = float(
                        primary["master_repl_offset"] - int(link.get("offset", 0))
                    )
                redis.kill_primary()
                started = time.monotonic()
                if replica.process is not None:
                    os.kill(replica.process.pid, signal.SIGCONT)
                figures["promoted"] = await asyncio.to_thread(redis.wait_failover, old)
            elif isinstance(redis, LocalCluster):
                victim = redis.node_of_slot(key_slot(keys.aes_stream("normal").encode()))
                redis.kill(victim)
                if scenario == "cluster-failover":  # its replica takes over; it stays down
                    figures["replica promoted"] = await asyncio.to_thread(
                        redis.wait_failover, victim
                    )
                else:
                    await asyncio.to_thread(redis.restart, victim)
                figures["cluster ok again"] = time.monotonic() - started
            return started

        tally, _ = await converse(
            conversations, MESSAGES, fault=fault, fault_after_answers=SESSIONS, answer_timeout=30
        )
        stack.check_alive()
        return tally, figures
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["sentinel", "sentinel-lagging", "cluster-restart", "cluster-failover"],
    )
    parser.add_argument("--lag-ms", type=int, default=300)
    args = parser.parse_args()
    for scenario in args.scenarios:
        redis: LocalRedis = LocalSentinel()
        if scenario == "cluster-restart":
            redis = LocalCluster(appendonly=True)
        elif scenario == "cluster-failover":
            redis = LocalCluster(replicas=1)
        try:
            redis.start()
            tally, figures = asyncio.run(run(redis, scenario, args.lag_ms))
        finally:
            redis.cleanup()
        extra = ", ".join(
            f"{name} {value / 1e6:.1f} MB" if "bytes" in name else f"{name} {value:.2f} s"
            for name, value in figures.items()
        )
        print(f"{scenario} ({extra}): {tally.line()}")
        for error in tally.errors[:5]:
            print(f"    {error}")


if __name__ == "__main__":
    main()
