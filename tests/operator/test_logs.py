"""The operator's log lines: one JSON object each, naming the resource they are about."""

from __future__ import annotations

import io
import json
import logging

import kopf

from services.core.logs import JsonFormatter
from services.operator.main import OperatorLogFields


def test_kopf_object_logs_become_json_lines_with_the_resource_name() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("operator"))
    handler.addFilter(OperatorLogFields())
    logger = logging.getLogger("tests.operator.logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        # What kopf's per-object logger adds to every record of a handler.
        logger.warning(
            "Ready=False (Conflict): tenant acme is owned by TierQuota a/b",
            extra={
                "settings": kopf.OperatorSettings(),
                "k8s_skip": False,
                "k8s_ref": {"kind": "TierQuota", "name": "acme", "namespace": "tenants"},
            },
        )
        logger.info("tier quota applied", extra={"resource": "tenants/acme", "tenant_id": "acme"})
    finally:
        logger.removeHandler(handler)

    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["resource"] == "tenants/acme"
    assert first["service"] == "operator"
    assert first["level"] == "WARNING"
    assert not {"settings", "k8s_ref", "k8s_skip"} & set(first)
    assert (second["resource"], second["tenant_id"]) == ("tenants/acme", "acme")
