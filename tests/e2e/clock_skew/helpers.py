"""Starting product processes whose wall clock is skewed (see skewed/sitecustomize.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from services.cli.stack import Child, LocalStack

SKEWED = str(Path(__file__).parent / "skewed")


def _skewed(stack: LocalStack, start: Callable[[], Child], offset: float) -> Child:
    saved = dict(stack.env)
    path = stack.env.get("PYTHONPATH")
    stack.env["PYTHONPATH"] = SKEWED + (os.pathsep + path if path else "")
    stack.env["CLOCK_SKEW_SECONDS"] = str(offset)
    try:
        return start()
    finally:
        stack.env.clear()
        stack.env.update(saved)


def start_skewed(stack: LocalStack, role: str, offset_seconds: float, **extra: str) -> Child:
    """`stack.start(role)` with the child's wall clock `offset_seconds` off."""
    return _skewed(stack, lambda: stack.start(role, **extra), offset_seconds)


def start_skewed_api(stack: LocalStack, offset_seconds: float) -> Child:
    """An api whose wall clock (tasks' `created_at`, deadlines, erasures) is off."""
    return _skewed(stack, stack.start_api, offset_seconds)
