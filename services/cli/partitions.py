"""`orchestrator partitions` / `partitions set N [--force]`: the installation's recorded
`CALLBACK_PARTITIONS`, and changing it.

Changing it while tasks are in flight loses their answers and deadlines (they are on the
partitions of the old count), so `set` refuses until the partitions hold nothing: stop the
apis, let the workers finish, set the count, start everything with it. The Redis side is
`services.core.partition_count`; this module only prints and picks the exit code.
"""

from __future__ import annotations

import json
import sys
from typing import TextIO

from services.core import partition_count
from services.core.partition_count import VARIABLE, InFlight
from services.core.redis_client import REDIS_DOWN, create_redis, not_reached
from services.core.settings import ConfigError, Settings

MAX_PARTITIONS = 1024  # ORCHESTRATOR_CALLBACK_PARTITIONS' bound (services.core.settings)


def _held(flight: InFlight) -> dict[str, int]:
    return {
        "tasks_in_flight": flight.tasks,
        "retries_waiting": flight.retries,
        "callbacks_unapplied": flight.callbacks,
    }


async def show_command(settings: Settings, out: TextIO = sys.stdout) -> int:
    """The recorded count, this environment's, and what the recorded partitions hold."""
    redis = create_redis(settings, max_connections=1)
    try:
        recorded = await partition_count.recorded_count(redis)
        flight = await partition_count.in_flight(
            redis, settings.callback_partitions if recorded is None else recorded
        )
    except REDIS_DOWN as exc:
        print(f"orchestrator: {not_reached(exc)}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    shown = {"recorded": recorded, "configured": settings.callback_partitions, **_held(flight)}
    print(json.dumps(shown, indent=2), file=out)
    if recorded is not None and recorded != settings.callback_partitions:
        print(
            f"orchestrator partitions: {VARIABLE} here is {settings.callback_partitions}; an "
            f"api or worker started with it refuses to start (the installation's is {recorded})",
            file=sys.stderr,
        )
    return 0


async def set_command(
    settings: Settings, count: int, *, force: bool, out: TextIO = sys.stdout
) -> int:
    """Record `count`; exit 1 while the recorded partitions hold anything (unless `force`)."""
    redis = create_redis(settings, max_connections=1)
    try:
        try:
            recorded = await partition_count.recorded_count(redis)
        except ConfigError:  # not a count: only --force writes over it
            if not force:
                raise
            recorded = None
        if recorded != count and not force:
            # Nothing recorded (an install older than the record, or the key deleted): the
            # work may be on any partition this environment's count or the new one names.
            held = recorded or max(settings.callback_partitions, count)
            flight = await partition_count.in_flight(redis, held)
            if not flight.empty:
                print(
                    f"orchestrator partitions set: the installation's {held} partitions "
                    f"still hold {flight.tasks} task(s) in flight, {flight.retries} retry(ies) "
                    f"waiting and {flight.callbacks} callback(s) not applied; stop the apis "
                    "(no new task), wait until `orchestrator partitions` shows none, then run "
                    "this again (--force changes it now: those answers and deadlines are lost)",
                    file=sys.stderr,
                )
                return 1
            stranded = await partition_count.stranded_dead_letters(redis, count)
            if stranded:
                print(
                    f"orchestrator partitions set: {stranded} dead letter(s) came from callback "
                    f"partitions {count} and above, which no worker reads with {count}: replay "
                    "or discard them first (`orchestrator deadletters list`; --force changes it "
                    "now, and their replay would be lost)",
                    file=sys.stderr,
                )
                return 1
        if recorded != count:
            await partition_count.change(redis, count)
    except REDIS_DOWN as exc:
        print(f"orchestrator: {not_reached(exc)}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()
    print(json.dumps({"recorded": count, "was": recorded}, indent=2), file=out)
    if recorded != count:
        print(
            f"orchestrator partitions set: start every api and worker with {VARIABLE}={count}; "
            "one still running with another count keeps it until it restarts, and one started "
            "with another count refuses to start",
            file=sys.stderr,
        )
    return 0
