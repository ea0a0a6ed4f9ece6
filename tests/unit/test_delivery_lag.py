"""A hop's lag is the time from an entry's stream id (Redis's milliseconds) to now."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from services.core.delivery_lag import DELIVERY_LAG_METRIC, LagClock


def observed(hop: str) -> tuple[float, float]:
    count = REGISTRY.get_sample_value(f"{DELIVERY_LAG_METRIC}_count", {"hop": hop}) or 0.0
    total = REGISTRY.get_sample_value(f"{DELIVERY_LAG_METRIC}_sum", {"hop": hop}) or 0.0
    return count, total


def in_bucket(hop: str, le: str) -> float:
    labels = {"hop": hop, "le": le}
    return REGISTRY.get_sample_value(f"{DELIVERY_LAG_METRIC}_bucket", labels) or 0.0


def test_the_lag_runs_from_the_ids_milliseconds_to_now() -> None:
    clock = LagClock("unit-seconds")
    clock.since("1700000000000-7", now=1_700_000_000.040)  # 40 ms after the id
    count, total = observed("unit-seconds")
    assert count == 1
    assert total == pytest.approx(0.040)
    assert in_bucket("unit-seconds", "0.025") == 0
    assert in_bucket("unit-seconds", "0.05") == 1


def test_a_clock_behind_redis_counts_zero_not_a_negative_lag() -> None:
    clock = LagClock("unit-skew")
    clock.since("1700000000500-0", now=1_700_000_000.0)  # this clock 0.5 s behind Redis's
    assert observed("unit-skew") == (1, 0.0)


@pytest.mark.parametrize("bad", ["", "abc-1", "-5", "12.5-0", "x"])
def test_an_id_that_is_not_a_stream_id_is_not_counted(bad: str) -> None:
    clock = LagClock("unit-bad")
    clock.since(bad, now=1_700_000_000.0)
    assert observed("unit-bad") == (0, 0.0)


def test_without_a_time_it_is_now() -> None:
    clock = LagClock("unit-now")
    clock.since("0-1")  # the epoch: now is ~1.7e9 s later
    count, total = observed("unit-now")
    assert count == 1
    assert total > 1_600_000_000


def test_a_traced_event_leaves_its_trace_id_on_its_bucket() -> None:
    """A slow delivery on the dashboard opens its trace: the exemplar is on the bucket the
    lag fell in."""
    clock = LagClock("unit-traced")
    trace = {"trace_id": "ab" * 16}
    clock.since("1700000000000-0", now=1_700_000_000.3, exemplar=trace)  # 300 ms: le=0.5
    exemplars = {
        sample.labels["le"]: sample.exemplar
        for family in REGISTRY.collect()
        if family.name == DELIVERY_LAG_METRIC
        for sample in family.samples
        if sample.labels.get("hop") == "unit-traced" and sample.name.endswith("_bucket")
    }
    assert exemplars["0.5"] is not None
    assert exemplars["0.5"].labels == trace
    assert exemplars["0.25"] is None
