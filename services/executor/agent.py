"""The simulated agent of the reference executor: deterministic replies, with fault injection.

A message's `context.simulate` steers it, so tests and demos can ask for behaviour:

- `fail_attempts` (int): fail every attempt up to this number (`retryable` says how).
- `retryable` (bool, default true): the `retryable` flag of those failures.
- `stall` (bool): never answer (the task runs into its deadline).
- `delay_ms` (number): wait this long before the first output.
- `chunk_delay_ms` (number): pace of streamed chunks (default: the executor's setting).
- `repeat` (int): repeat the reply this many times (longer streams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MODEL = "reference-echo-1"
INPUT_PRICE_PER_TOKEN = 0.5e-6
OUTPUT_PRICE_PER_TOKEN = 1.5e-6
MAX_REPEAT = 1000


@dataclass(frozen=True, slots=True)
class Simulation:
    fail_attempts: int = 0
    retryable: bool = True
    stall: bool = False
    delay_ms: float = 0.0
    chunk_delay_ms: float | None = None
    repeat: int = 1

    @classmethod
    def from_context(cls, context: dict[str, Any]) -> Simulation:
        raw = context.get("simulate")
        if not isinstance(raw, dict):
            return cls()

        def number(name: str, default: float) -> float:
            return _usable_number(raw.get(name), default)

        chunk_delay = _usable_number(raw.get("chunk_delay_ms"), math.inf)  # inf: absent
        return cls(
            fail_attempts=int(number("fail_attempts", 0)),
            retryable=bool(raw.get("retryable", True)),
            stall=bool(raw.get("stall", False)),
            delay_ms=max(0.0, number("delay_ms", 0.0)),
            chunk_delay_ms=None if chunk_delay == math.inf else chunk_delay,
            repeat=max(1, min(MAX_REPEAT, int(number("repeat", 1)))),
        )


def _usable_number(value: object, default: float) -> float:
    """`value` as a finite float, or `default` when it is none: not a number, or an integer
    beyond a double (JSON allows 10**400; `float()` of it raised OverflowError and the run
    died, again at every reclaim). An unusable knob is treated like an absent one."""
    if not isinstance(value, int | float):
        return default
    try:
        number = float(value)
    except OverflowError:
        return default
    return number if math.isfinite(number) else default


def reply_for(agent_id: str, message: str, repeat: int = 1) -> str:
    """The deterministic answer: the same message always gets the same reply."""
    base = f"[{agent_id}] You said: {message}"
    return " ".join([base] * repeat)


def chunks_of(reply: str) -> list[str]:
    """Word-sized deltas whose concatenation is exactly `reply`."""
    words = reply.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


def usage_for(message: str, reply: str) -> tuple[int, int, float]:
    input_tokens = len(message.split())
    output_tokens = len(reply.split())
    cost = input_tokens * INPUT_PRICE_PER_TOKEN + output_tokens * OUTPUT_PRICE_PER_TOKEN
    return input_tokens, output_tokens, round(cost, 9)
