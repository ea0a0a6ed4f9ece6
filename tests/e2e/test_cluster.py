"""The end-to-end suite on a real 3-master Redis Cluster (the session's `redis_cluster`).

The representative tests of the single-server suite (message path, cross-pod delivery,
per-session order, tenancy limits, resume) run here again, unchanged: in this module
`e2e_redis` is the cluster, and `new_stack` starts every process in cluster mode. Keys,
scripts, spreading and a node restart are in `test_cluster_faults.py` (its own module, so that
the deployments of this one are gone when it runs).
"""

from __future__ import annotations

import pytest

from services.cli.embedded import LocalCluster

# The single-server suite's representative tests, collected again in this module.
from tests.e2e.test_faults import (  # noqa: F401
    test_resume_beyond_retention_says_resumed_false_and_within_it_replays_exactly,
)
from tests.e2e.test_message_path import (  # noqa: F401
    test_cancel_mid_stream_stops_the_answer,
    test_cross_pod_delivery_reaches_every_socket_once_in_order,
    test_per_session_order_holds_with_two_workers,
    test_rest_message_streams_back_on_the_socket_and_completes,
    test_resume_with_last_event_id_replays_missed_events_once,
    test_socket_chat_send_gets_the_same_answer,
)
from tests.e2e.test_tenancy import (  # noqa: F401
    tenancy,
    tenancy_stack,
    test_a_quota_change_by_the_cli_applies_on_running_apis_within_two_seconds,
    test_a_rate_limited_socket_send_gets_chat_error_and_stays_open,
    test_a_tenant_over_its_token_budget_is_refused_until_midnight_utc,
    test_an_idempotent_send_returns_the_first_task_and_enqueues_once,
    test_the_request_after_the_session_limit_is_refused_across_api_processes,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def e2e_redis(redis_cluster: LocalCluster) -> LocalCluster:
    """In this module every end-to-end test runs on the cluster."""
    return redis_cluster
