"""Every garbage collection of the process is one observation of its generation's pauses."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from services.core.gc_pauses import GC_PAUSE_METRIC, watch_gc_pauses


def observed(generation: int) -> tuple[float, float]:
    labels = {"generation": str(generation)}
    count = REGISTRY.get_sample_value(f"{GC_PAUSE_METRIC}_count", labels)
    total = REGISTRY.get_sample_value(f"{GC_PAUSE_METRIC}_sum", labels)
    assert count is not None
    assert total is not None
    return count, total


def test_each_collection_is_observed_once_under_its_generation() -> None:
    watch_gc_pauses()
    watch_gc_pauses()  # a second call must not count every collection twice
    for generation in (0, 1, 2):
        gc.disable()  # no automatic collection between the reads
        try:
            count, total = observed(generation)
            gc.collect(generation)
            after_count, after_total = observed(generation)
        finally:
            gc.enable()
        assert after_count == count + 1
        assert after_total > total


def test_every_generation_is_exported_before_any_collection() -> None:
    samples = {
        sample.labels["generation"]
        for family in REGISTRY.collect()
        if family.name == GC_PAUSE_METRIC
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    assert samples == {"0", "1", "2"}
