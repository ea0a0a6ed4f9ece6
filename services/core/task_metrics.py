"""`orchestrator_tasks_total{status,tier}`: counted where a task changes status (the api accepts
and cancels, the worker completes, fails, retries and times out). One definition, so a
process (or a test run) that loads both sides registers it once."""

from __future__ import annotations

from prometheus_client import Counter

tasks = Counter("orchestrator_tasks", "Tasks reaching a status, by tier", ["status", "tier"])
