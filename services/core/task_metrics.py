"""`orchestrator_tasks_total{status,tier}`: counted where a task changes status (the api accepts
and cancels, the worker completes, fails, retries and times out). One definition, so a
process (or a test run) that loads both sides registers it once."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from prometheus_client import Counter

tasks = Counter("orchestrator_tasks", "Tasks reaching a status, by tier", ["status", "tier"])


def create_series(counter: Counter, *label_sets: Iterable[str]) -> None:
    """Export every combination of the labels a process may count, at 0 from its start.
    prometheus_client creates a labelled series at its first increment, already at 1, and
    `rate()` / `increase()` need an earlier sample: a pod's first failed task, first 429 of a
    scope or first late callback never showed on the dashboard nor in an alert."""
    for labels in itertools.product(*label_sets):
        counter.labels(*labels)
