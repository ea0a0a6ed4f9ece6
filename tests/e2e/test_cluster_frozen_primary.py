"""/health/detailed on a real 3-master Redis Cluster with one primary frozen (SIGSTOP: the
TCP connections stay open and nothing answers, the `redis_client` docstring's "Redis frozen
or unreachable" case).

`redis_client`: a frozen Redis fails a command after `socket_timeout` (worker_sleep + 2 s);
"a timeout is not retried: the command may have run". On one frozen server /health/detailed
answers 503 in ~3 s. On a cluster the write probe is a cluster *pipeline* (one SET per
primary), and redis-py's cluster pipeline retries a timeout (`RedisCluster.ERRORS_ALLOW_RETRY`
holds TimeoutError; `ClusterClient` narrowed it for single commands only): 4 timeouts and
3 x 0.25 s, and the answer takes ~16 s, past any monitoring probe's timeout (the very case
commit 738af5d "asks Redis everything at once" was about).

Found by the review of session 16's changes on a cluster. Fixed: the cluster pipelines retry
what single commands retry (no timeout).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from services.cli.embedded import LocalCluster
from services.cli.stack import Child
from services.core.redis_client import COMMAND_TIMEOUT_SECONDS
from services.core.settings import load_settings
from tests.e2e.conftest import lone_api

pytestmark = pytest.mark.e2e

SOCKET_TIMEOUT = load_settings().worker_sleep_seconds + COMMAND_TIMEOUT_SECONDS


@pytest.fixture(scope="module")
def api(own_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    with lone_api(own_cluster, tmp_path_factory.mktemp("logs")) as child:
        yield child


async def test_health_detailed_with_a_frozen_primary_answers_within_a_command_timeout(
    own_cluster: LocalCluster, api: Child
) -> None:
    async with httpx.AsyncClient() as http:
        healthy = await http.get(f"{api.url}/health/detailed", timeout=10)
        assert healthy.status_code == 200, healthy.text
        frozen = own_cluster.nodes[1]
        assert frozen.process is not None
        os.kill(frozen.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            answer = await http.get(f"{api.url}/health/detailed", timeout=40)
            took = time.monotonic() - started
        finally:
            os.kill(frozen.process.pid, signal.SIGCONT)
    body = answer.json()
    assert (answer.status_code, body["components"]["redis"]["status"]) == (503, "down"), body
    # One command timeout (as on one server: ~3 s), with room for a slow machine.
    assert took < 2 * SOCKET_TIMEOUT, f"/health/detailed took {took:.1f} s"
