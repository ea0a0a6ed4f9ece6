"""docs/kubernetes.md, "Upgrade": generated secrets are read back with `lookup` and kept, and
pods roll when the settings or the chart's Secrets change. So an upgrade that changes nothing
rolls no pod: above all not the in-chart Redis, whose data lives in an emptyDir.

Offline, Helm's `lookup` finds nothing: these tests render a copy of the chart whose
`lookup "v1" "Secret"` calls return the Secrets an earlier render produced (as the API server
returns them: `data` base64-encoded, with their metadata).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.chart.conftest import CHART_DIR, Rendered, parse, render

LOOKUP = 'lookup "v1" "Secret" .Release.Namespace $name'


def _chart_seeing(installed: Rendered, folder: Path) -> Path:
    """A copy of the chart whose lookups find the Secrets `installed` rendered."""
    stored = {
        secret["metadata"]["name"]: {"data": secret.get("data") or {}, "metadata": metadata}
        for secret in installed.of_kind("Secret")
        if "helm.sh/hook" not in (metadata := secret["metadata"])["annotations"]
    }
    chart = folder / "agent-orchestrator"
    shutil.copytree(CHART_DIR, chart)
    for template in ("redis.yaml", "postgresql.yaml", "secrets.yaml"):
        path = chart / "templates" / template
        assert LOOKUP in path.read_text(), template
        path.write_text(
            path.read_text().replace(LOOKUP, '(include "test.lookup" $name | fromJson)')
        )
    (chart / "templates" / "_test_lookup.tpl").write_text(
        '{{- define "test.lookup" -}}\n'
        f"{{{{- $stored := `{json.dumps(stored)}` | fromJson -}}}}\n"
        "{{- index $stored . | default dict | toJson -}}\n"
        "{{- end -}}\n"
    )
    return chart


def _pod_annotations(rendered: Rendered) -> dict[str, dict[str, str]]:
    return {
        f"{obj['kind']}/{obj['metadata']['name']}": dict(
            template["metadata"].get("annotations") or {}
        )
        for obj, template in rendered.pod_templates()
        if obj["kind"] in ("Deployment", "StatefulSet")
    }


def _changed(before: Rendered, after: Rendered) -> dict[str, list[str]]:
    old, new = _pod_annotations(before), _pod_annotations(after)
    changed = {
        workload: sorted(k for k in old[workload] if old[workload][k] != new[workload].get(k))
        for workload in old
    }
    return {workload: keys for workload, keys in changed.items() if keys}


@pytest.mark.parametrize(
    "values", [{}, {"executor": {"enabled": True}}], ids=["defaults", "with executor"]
)
def test_a_first_upgrade_that_changes_nothing_rolls_no_pod(
    values: dict[str, Any], tmp_path: Path
) -> None:
    """The install's checksums were taken over a second random JWT secret (not the stored
    one), and Redis's over its generated password in the clear, its upgrade's over the stored
    one scrypted: the first upgrade rolled the apis and restarted Redis on a fresh emptyDir
    (every session, task, stream entry and quota override gone)."""
    install = parse("install", values, render(values))
    upgrade = parse(
        "upgrade", values, render(values, chart_dir=_chart_seeing(install, tmp_path), upgrade=True)
    )
    for secret in install.of_kind("Secret"):  # the lookups worked: the secrets are kept
        if "helm.sh/hook" not in secret["metadata"]["annotations"]:
            name = secret["metadata"]["name"]
            assert upgrade.get("Secret", name)["data"] == secret["data"], name
    assert not _changed(install, upgrade)


def test_a_password_kept_from_the_values_keeps_its_checksum_and_its_digest(
    tmp_path: Path,
) -> None:
    """Installed with redis.password, upgraded without it: the stored password is kept, Redis
    is not restarted, and (a human password) never appears hashed in the clear in an annotation."""
    password = "correct horse battery staple"
    with_password = {"redis": {"password": password}}
    install = parse("install", with_password, render(with_password))
    assert (
        "orchestrator.agents.io/generated"
        not in (install.get("Secret", "ao-agent-orchestrator-redis")["metadata"]["annotations"])
    )
    upgrade = parse(
        "upgrade", {}, render({}, chart_dir=_chart_seeing(install, tmp_path), upgrade=True)
    )
    assert "StatefulSet/ao-agent-orchestrator-redis" not in _changed(install, upgrade)
    plain = hashlib.sha256(password.encode()).hexdigest()
    annotations = _pod_annotations(upgrade)["StatefulSet/ao-agent-orchestrator-redis"]
    assert plain not in annotations.values()


def test_a_new_redis_password_in_the_values_restarts_redis(tmp_path: Path) -> None:
    install = parse("install", {}, render({}))
    changed = {"redis": {"password": "a-new-password-of-our-own"}}
    upgrade = parse(
        "upgrade",
        changed,
        render(changed, chart_dir=_chart_seeing(install, tmp_path), upgrade=True),
    )
    assert (
        "checksum/secret" in _changed(install, upgrade)["StatefulSet/ao-agent-orchestrator-redis"]
    )
