"""Loaded at start by a child process that has this directory on PYTHONPATH: its wall clock
(`time.time`, `time.time_ns`) runs CLOCK_SKEW_SECONDS ahead (negative: behind), as on a pod
whose clock is not synchronised. Every timestamp of the product that another process compares
is read through `services.core.clock` (from `time.time`, plus the offset to Redis's clock it
measures). `datetime.now` is left alone: its C type cannot be replaced without breaking the
types msgspec reads (the reviewer's version wrapped the old `actions.utcnow` instead)."""

import os
import time

_offset = float(os.environ.get("CLOCK_SKEW_SECONDS", "0") or 0)
if _offset:
    _real_time, _real_time_ns = time.time, time.time_ns
    time.time = lambda: _real_time() + _offset
    time.time_ns = lambda: _real_time_ns() + int(_offset * 1_000_000_000)
