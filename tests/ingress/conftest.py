"""Two real api processes, a worker and an executor behind a real nginx (./nginx.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.cli.embedded import RedisServer
from services.cli.stack import Child, LocalStack
from tests.e2e.conftest import FAST_EXECUTOR, e2e_redis, new_stack
from tests.ingress.nginx import Nginx

__all__ = ["e2e_redis"]

ORIGIN = "https://app.example.com"

# What every stack here runs with: the chart's defaults but for a fast executor, compression on
# (to see it negotiated through the proxy), an allowed page origin, a 1 s drain window and a
# ping every second (so that an idle socket can be shown alive past a short read timeout).
SETTINGS = {
    **FAST_EXECUTOR,
    "websocket_compression": "true",
    "allowed_origins": ORIGIN,
    "drain_seconds": "1",
    "websocket_ping_interval": "1",
}


@dataclass
class Front:
    redis: RedisServer
    stack: LocalStack
    a: Child
    b: Child
    nginx: Nginx


def start_front(redis: RedisServer, root: Path, **settings: str) -> Front:
    """Both apis, a worker and an executor, ready, then nginx in front of the apis."""
    stack = new_stack(redis, root / "logs", **{**SETTINGS, **settings})
    try:
        a, b = stack.start_api(), stack.start_api()
        stack.start("worker")
        stack.start("executor")
        stack.wait_ready(a, b)
        assert a.port is not None
        assert b.port is not None
        nginx = Nginx(root / "nginx", a.port, b.port).start()
    except BaseException:
        stack.stop()
        raise
    return Front(redis, stack, a, b, nginx)


def stop_front(front: Front) -> None:
    front.nginx.stop()
    front.stack.stop()


@pytest.fixture(scope="module")
def front(e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """One deployment behind nginx for a module's tests."""
    started = start_front(e2e_redis, tmp_path_factory.mktemp("front"))
    yield started
    stop_front(started)


@pytest.fixture
def own_front(e2e_redis: RedisServer, tmp_path: Path) -> Iterator[Front]:
    """A deployment of the test's own: for a test that drains or stops an api."""
    started = start_front(e2e_redis, tmp_path)
    yield started
    stop_front(started)
