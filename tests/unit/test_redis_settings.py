"""The Redis topology settings (issue 11): modes, sentinel addresses, one clear line each."""

from __future__ import annotations

import pytest

from services.core.redis_client import (
    POOL_WAIT_SECONDS,
    ClusterClient,
    WaitingConnectionPool,
    WaitingSentinelConnectionPool,
    create_redis,
    is_cluster,
)
from services.core.settings import ConfigError, RedisMode, load_settings


@pytest.mark.parametrize("address", ["sentinel-a", "host:port", ":26379", "host:70000"])
def test_a_sentinel_address_must_be_host_and_port(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_MODE", "sentinel")
    monkeypatch.setenv("ORCHESTRATOR_REDIS_SENTINELS", f"10.0.0.1:26379,{address}")
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value).startswith("ORCHESTRATOR_REDIS_SENTINELS:")
    assert address in str(error.value)


def test_sentinels_are_parsed_into_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_MODE", "sentinel")
    monkeypatch.setenv("ORCHESTRATOR_REDIS_SENTINELS", "s1:26379, s2:26380")
    monkeypatch.setenv("ORCHESTRATOR_REDIS_SENTINEL_MASTER", "orchestrator")
    settings = load_settings()
    assert settings.redis_mode is RedisMode.sentinel
    assert settings.sentinel_addresses == [("s1", 26379), ("s2", 26380)]
    assert settings.redis_sentinel_master == "orchestrator"


@pytest.mark.parametrize(
    ("mode", "missing"), [("cluster", "REDIS_URL (a seed node)"), ("sentinel", "REDIS_SENTINELS")]
)
def test_a_mode_needs_its_addresses_once_a_client_is_built(
    monkeypatch: pytest.MonkeyPatch, mode: str, missing: str
) -> None:
    """Loading succeeds (migrate and prune read the services' ConfigMap and never reach
    Redis: the chart gives them no Redis Secret); building a client names what is missing."""
    monkeypatch.setenv("ORCHESTRATOR_REDIS_MODE", mode)
    settings = load_settings()
    with pytest.raises(ConfigError) as error:
        create_redis(settings)
    assert str(error.value) == f"ORCHESTRATOR_{missing} is required when REDIS_MODE is {mode}"


async def test_each_mode_builds_its_kind_of_client_without_connecting() -> None:
    cluster = create_redis(load_settings(redis_mode="cluster", redis_url="rediss://u:p@seed:7000"))
    assert isinstance(cluster, ClusterClient)
    assert is_cluster(cluster)
    plain = create_redis(load_settings())
    sentinel = create_redis(
        load_settings(
            redis_mode="sentinel", redis_sentinels=["s1:26379"], redis_url="redis://:pw@x/2"
        )
    )
    assert not is_cluster(plain)
    assert not is_cluster(sentinel)
    assert sentinel.connection_pool.connection_kwargs["password"] == "pw"
    assert sentinel.connection_pool.connection_kwargs["db"] == 2
    # Both pools wait for a free connection in a burst instead of failing at once.
    assert isinstance(plain.connection_pool, WaitingConnectionPool)
    assert isinstance(sentinel.connection_pool, WaitingSentinelConnectionPool)
    for pooled in (plain, sentinel):
        assert pooled.connection_pool.timeout == POOL_WAIT_SECONDS  # type: ignore[attr-defined]
        assert "timeout" not in pooled.connection_pool.connection_kwargs
    for client in (cluster, plain, sentinel):
        await client.aclose()
