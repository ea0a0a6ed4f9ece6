"""The operator's RBAC rules: least privilege, and the same in the code and in the docs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from services.operator.rbac import allows, required_rules

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operator.md"


def test_the_rules_have_no_wildcards_and_never_write_what_kopf_only_patches() -> None:
    for clusterwide in (False, True):
        rules = required_rules(clusterwide=clusterwide, peering_name="agent-orchestrator")
        for rule in rules:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field]
        for verb in ("get", "create", "update", "delete"):
            assert not allows(
                rules, group="orchestrator.agents.io", resource="tierquotas", verb=verb
            )
        assert not allows(rules, group="", resource="secrets", verb="list")


def test_peering_rules_follow_the_mode_and_name_the_peering_object() -> None:
    assert all(
        rule["apiGroups"] != ["kopf.dev"]
        for rule in required_rules(clusterwide=False, peering_name=None)
    )
    namespaced = required_rules(clusterwide=False, peering_name="p")
    assert allows(namespaced, group="kopf.dev", resource="kopfpeerings", verb="patch", name="p")
    assert not allows(namespaced, group="kopf.dev", resource="kopfpeerings", verb="patch", name="q")
    clusterwide = required_rules(clusterwide=True, peering_name="p")
    assert allows(clusterwide, group="kopf.dev", resource="clusterkopfpeerings", verb="watch")
    assert not allows(clusterwide, group="kopf.dev", resource="kopfpeerings", verb="watch")


def test_the_documented_role_is_the_rules_of_the_code() -> None:
    blocks = re.findall(r"```yaml\n(rules:\n.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert blocks, "docs/operator.md lost its Role rules"
    documented = yaml.safe_load(blocks[0])["rules"]
    assert documented == required_rules(clusterwide=False, peering_name="agent-orchestrator")
