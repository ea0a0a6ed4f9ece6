"""checkov over every rendered value set, once: no failed check without a reviewed reason."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import Rendered, clean

SKIPS_FILE = Path(__file__).parent / "checkov-skips.yaml"
CHECKOV = Path(sys.executable).parent / "checkov"


@pytest.fixture(scope="module")
def skips() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(SKIPS_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def failed_checks(
    all_rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("manifests")
    for name, rendered in all_rendered.items():
        with (folder / f"{name}.yaml").open("w") as out:
            yaml.safe_dump_all([clean(o) for o in rendered.objects], out, sort_keys=False)
    result = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(folder),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    (report,) = [r for r in reports if r["check_type"] == "kubernetes"]
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 100, summary
    assert summary["passed"] > 1000, summary
    failures: list[dict[str, Any]] = report["results"]["failed_checks"]
    for failure in failures:
        failure["value_set"] = Path(failure["file_path"]).stem
    return failures


def _covers(skip: dict[str, Any], failure: dict[str, Any]) -> bool:
    if skip["id"] != failure["check_id"]:
        return False
    if failure["value_set"] in skip.get("except_value_sets", []):
        return False
    patterns = skip.get("resources")
    return patterns is None or any(re.search(p, failure["resource"]) for p in patterns)


def test_every_skip_has_a_reason(skips: list[dict[str, Any]]) -> None:
    for skip in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+", skip["id"]), skip
        assert len(skip.get("reason", "").split()) >= 8, f"{skip['id']}: give the reason"


def test_no_failed_check_without_a_documented_skip(
    failed_checks: list[dict[str, Any]], skips: list[dict[str, Any]]
) -> None:
    unexplained = sorted(
        f"{f['value_set']}: {f['check_id']} {f['check_name']} on {f['resource']}"
        for f in failed_checks
        if not any(_covers(s, f) for s in skips)
    )
    assert not unexplained, "\n".join(unexplained)


def test_no_stale_skips(failed_checks: list[dict[str, Any]], skips: list[dict[str, Any]]) -> None:
    stale = [s["id"] for s in skips if not any(_covers(s, f) for f in failed_checks)]
    assert not stale, f"these checks pass now: remove them from {SKIPS_FILE.name}: {stale}"
