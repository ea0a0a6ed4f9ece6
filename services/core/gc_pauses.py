"""This process's garbage-collection pauses, as a Prometheus histogram per generation.

A collection stops the whole process: every socket, request or callback it holds waits until
it ends. A full collection walks every tracked object, so its pause grows with the heap, not
with the work: under load the api's took 90-177 ms before its start-up heap was frozen, the
worker's 50-115 ms and the executor's 32-45 ms (bench runs with a gc callback like this one).
On the dashboard such pauses show up as what they are instead of as unexplained p99 spikes.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Histogram

GC_PAUSE_METRIC = "orchestrator_gc_pause_seconds"

gc_pauses = Histogram(
    GC_PAUSE_METRIC,
    "Garbage-collection pauses of this process (the whole process waits), by generation",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
# One child per generation, made now: the series exist from the start, and a collection's
# callback does no label lookup.
_by_generation = [gc_pauses.labels(str(generation)) for generation in range(3)]
_started = 0.0


def _observe(phase: str, info: dict[str, Any]) -> None:
    # Collections never overlap (the collector runs one at a time under the GIL), so one
    # start time serves every thread.
    global _started
    if phase == "start":
        _started = time.perf_counter()
    else:
        _by_generation[info["generation"]].observe(time.perf_counter() - _started)


def watch_gc_pauses() -> None:
    """Observe every collection of this process from now on (once, however often called)."""
    if _observe not in gc.callbacks:
        gc.callbacks.append(_observe)
