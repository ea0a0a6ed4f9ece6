"""Histogram buckets shared by every process: 1 ms to 5 min, the real range of a chat answer."""

from __future__ import annotations

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip
