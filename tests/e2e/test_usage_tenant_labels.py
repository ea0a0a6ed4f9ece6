"""The bounded tenant labels of the usage metrics (`ORCHESTRATOR_METRICS_TENANT_LABELS`), on a
deployment of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from tests.e2e.conftest import deploy
from tests.e2e.test_sre_journey import chat_on, scrape, until

pytestmark = pytest.mark.e2e


async def test_usage_metrics_label_the_first_tenants_then_other(tmp_path: Path) -> None:
    """README: `orchestrator_usage_tokens_total{tenant,direction}` and
    `orchestrator_usage_cost_total{tenant}` label the first `ORCHESTRATOR_METRICS_TENANT_LABELS`
    tenants each worker meets, the rest `~other`. Guard (no other test sets the cap): with a
    cap of 1, the first tenant has its own series and the second is counted under `~other`."""
    redis = RedisServer().start()  # its own: the usage series count every tenant met
    try:
        with deploy(
            redis, tmp_path / "logs", metrics_tenant_labels="1", executor_chunk_delay_ms="1"
        ) as deployed:
            worker = next(c for c in deployed.stack.children if c.role == "worker")
            first, _ = await chat_on(deployed.api)
            second, _ = await chat_on(deployed.api)

            def labelled() -> tuple[set[str], set[str]]:
                # the client may hold the answer before the worker has counted its usage
                families = scrape(worker.metrics_port)
                return tuple(  # type: ignore[return-value]
                    {dict(labels)["tenant"] for (_, labels) in families[name].samples}
                    for name in ("orchestrator_usage_tokens", "orchestrator_usage_cost")
                )

            await until(lambda: len(labelled()[1]) == 2, f"usage of {second} never counted")
            tokens, cost = labelled()
            assert tokens == cost == {first, "~other"}, (tokens, cost, second)
    finally:
        redis.cleanup()
