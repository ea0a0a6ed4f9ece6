"""The benchmark's printed table: each figure next to the peer's, with the right ratio."""

from __future__ import annotations

from bench.run import table


def _row(printed: str, figure: str) -> list[str]:
    for line in printed.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 1 and cells[1] == figure:
            return cells
    raise AssertionError(f"no row {figure!r} in:\n{printed}")


def test_the_path_without_the_worker_has_its_latency_row() -> None:
    """`--direct` splits the delivery p99 line: the same path without the worker hop, at half
    of its own rate, against the peer's p99."""
    half = {"rate": 6000.0}
    results = {
        "delivery": {
            "ours": {"events_per_s": 12000.0, "p50_ms": 2.0, "p99_ms": 8.0},
            "peer": {"events_per_s": 6000.0, "p50_ms": 0.5, "p99_ms": 4.0},
            "ours_direct": {
                "events_per_s": 14000.0,
                "p50_ms": 0.9,
                "p99_ms": 3.0,
                "latency_at_half_rate": half,
            },
        }
    }
    printed = table(results)
    assert _row(printed, "p99 ms at half of own rate")[2:] == ["8.00", "socketio 4.00", "2.00x"]
    assert _row(printed, "p50 / p99 ms at half of own rate, no worker")[2:] == [
        "0.90 / 3.00",
        "socketio 0.50 / 4.00",
        "0.75x",
    ]


def test_without_direct_there_is_no_such_row() -> None:
    results = {
        "delivery": {
            "ours": {"events_per_s": 12000.0, "p50_ms": 2.0, "p99_ms": 8.0},
            "peer": {"events_per_s": 6000.0, "p50_ms": 0.5, "p99_ms": 4.0},
        }
    }
    assert "no worker" not in table(results)
