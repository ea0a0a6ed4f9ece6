"""docs/kubernetes.md keeps up with the chart: every value is in its table, every alert has
its runbook section (the alerts' runbook_url anchors)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.chart.conftest import CHART_DIR, ROOT

DOC = ROOT / "docs" / "kubernetes.md"


def _leaves(values: Any, path: tuple[str, ...] = ()) -> list[str]:
    if (
        isinstance(values, dict)
        and values
        and path not in (("tiers",),)
        and (not path or path[-1] != "annotations")
    ):
        return [leaf for key, value in values.items() for leaf in _leaves(value, (*path, key))]
    return [".".join(path)]


def test_values_table_lists_every_value(chart_values: dict[str, Any]) -> None:
    rows = set(re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.M))
    missing = [key for key in _leaves(chart_values) if key not in rows]
    assert not missing, f"add to the values table of docs/kubernetes.md: {missing}"


def test_every_alert_has_a_runbook_section() -> None:
    text = (CHART_DIR / "files" / "alerts.yaml").read_text()
    text = re.sub(r"^\s*\{\{-? *(if|end)\b.*?\}\}\s*\n", "", text, flags=re.M)  # a rule's guard
    alerts = yaml.safe_load(re.sub(r"\{\{.*?\}\}", "x", text))
    headings = set(re.findall(r"^### (\w+)$", DOC.read_text(), re.M))
    for rule in alerts["groups"][0]["rules"]:
        assert rule["alert"] in headings
        assert rule["annotations"]["runbook_url"].endswith("#" + rule["alert"].lower())
