"""docs/kubernetes.md, NOTES.txt and values.yaml read word by word against the rendered chart
(the real Helm SDK through tests/chart/conftest.py), the code's Settings and a real shell: each
test does what the text says, and fails where the chart or the docs promise something else."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from helm_python import Chart, HelmError

from services.core.settings import ENV_PREFIX, Settings
from tests.chart.conftest import (
    CHART_DIR,
    KEDA_APIS,
    PROMETHEUS_OPERATOR_APIS,
    ROOT,
    Rendered,
    clean,
    load_values,
    parse,
    render,
)

DOC = ROOT / "docs" / "kubernetes.md"
FIXED_JWT = {"auth": {"secret": "s" * 64}}  # otherwise secrets.yaml is random per render
CONFIG_MAP = "ao-agent-orchestrator-config"
PRUNE = "ao-agent-orchestrator-prune"
ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")


def _render(
    values: dict[str, Any], api_versions: tuple[str, ...] = (), *, upgrade: bool = False
) -> Rendered:
    return parse("promises", values, render(values, api_versions, upgrade=upgrade))


def _sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)


def _refusal(values: dict[str, Any]) -> str | None:
    """Helm's error when the chart refuses these values, None when it renders them."""
    try:
        _render(values)
    except HelmError as refused:
        return str(refused)
    return None


def _doc_command(prefix: str) -> list[str]:
    """The shell words of the first command of docs/kubernetes.md that starts with `prefix`
    (continuation lines joined)."""
    text = DOC.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip().startswith(prefix):
            return shlex.split(line.strip())
    raise AssertionError(f"docs/kubernetes.md has no command starting with {prefix!r}")


def _egress_ports(policy: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for rule in policy["spec"].get("egress") or []:
        for port in rule.get("ports") or []:
            if isinstance(port["port"], int):
                ports.add(port["port"])
    return ports


# --- the production install reaches its own Redis through the NetworkPolicies --------------


def _documented_production_values() -> dict[str, dict[str, Any]]:
    """The two ways "Install / Production" tells to install: the complete example file, and
    the minimum it lists."""
    digest = "sha256:" + "a" * 64
    minimum = {
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "orchestrator-redis"},
        "postgresql": {"enabled": False},
        "externalDatabase": {"existingSecret": "orchestrator-database"},
        "auth": {"existingSecret": "orchestrator-jwt"},
        "api": {"image": {"digest": digest}},
        "worker": {"image": {"digest": digest}},
    }
    return {"production.yaml": load_values("production.yaml"), "the listed minimum": minimum}


@pytest.mark.parametrize("how", ["production.yaml", "the listed minimum"])
def test_documented_redis_secret_is_reachable_through_the_network_policy(how: str) -> None:
    """The documented `redis-url` Secret, installed with production.yaml (or the listed
    minimum): its port must be one the api and worker NetworkPolicies let out, or every pod
    times out connecting to Redis (the doc used a TLS Redis on 6380, allowed by neither)."""
    words = _doc_command("kubectl -n chat create secret generic orchestrator-redis")
    literal = next(w for w in words if w.startswith("--from-literal=redis-url="))
    url = urlsplit(literal.split("=", 2)[2])
    assert url.port is not None
    rendered = _render(_documented_production_values()[how], PROMETHEUS_OPERATOR_APIS + KEDA_APIS)
    for component in ("api", "worker"):
        allowed = _egress_ports(rendered.get("NetworkPolicy", f"ao-agent-orchestrator-{component}"))
        assert url.port in allowed, f"{how}: {component} egress {sorted(allowed)}, not {url.port}"
    assert "must use a port of `networkPolicy.externalRedis.ports`" in DOC.read_text()


# --- config.extraEnv: "Names the chart already sets are refused" -----------------------


def _effective_env(rendered: Rendered, deployment: str, container: str) -> dict[str, str]:
    """What the process sees: the ConfigMaps of envFrom, then `env` (which wins)."""
    obj = rendered.get("Deployment", deployment)
    (spec,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == container]
    env: dict[str, str] = {}
    for source in spec.get("envFrom") or []:
        env.update(rendered.get("ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in spec.get("env") or []:
        env[entry["name"]] = entry.get("value", "<from " + str(entry.get("valueFrom")) + ">")
    return env


@pytest.mark.parametrize(
    ("values", "name", "value", "deployment", "container"),
    [
        ({}, "OTEL_SDK_DISABLED", "false", "ao-agent-orchestrator-api", "api"),
        (
            {"otel": {"enabled": True}},
            "OTEL_TRACES_SAMPLER_ARG",
            "1.0",
            "ao-agent-orchestrator-worker",
            "worker",
        ),
        (
            {"otel": {"enabled": True}},
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector.example:4318",
            "ao-agent-orchestrator-api",
            "api",
        ),
    ],
)
def test_config_extra_env_refuses_or_applies_names_the_chart_sets(
    values: dict[str, Any], name: str, value: str, deployment: str, container: str
) -> None:
    """A name in config.extraEnv that the container's own `env` also sets would land in the
    ConfigMap and be silently overridden: it must be refused, or reach the process."""
    values = {**FIXED_JWT, **values, "config": {"extraEnv": {name: value}}}
    refusal = _refusal(values)
    if refusal is not None:
        assert "already set by the chart" in refusal
        return
    effective = _effective_env(_render(values), deployment, container)
    assert effective.get(name) == value, f"{container} sees {name}={effective.get(name)!r}"


def _names_set_beside_the_config_map(rendered: Rendered) -> set[str]:
    """Every `env` name the chart sets on a container that also reads the settings ConfigMap
    (envFrom); the names of the components' own `extraEnv` lists are the user's."""
    users = {
        entry["name"]
        for component in ("api", "worker", "executor", "operator")
        for entry in rendered.values.get(component, {}).get("extraEnv", [])
    }
    names: set[str] = set()
    for _, pod in rendered.pod_specs():
        for container in pod["containers"]:
            sources = [s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])]
            if CONFIG_MAP in sources:
                names |= {entry["name"] for entry in container.get("env", [])}
    return names - users


def test_config_extra_env_refuses_every_name_any_container_sets(
    all_rendered: dict[str, Rendered],
) -> None:
    """The names come from the rendered containers of every value set (otel on and off, keda,
    the operator, the prune CronJob), not from a list: a name the chart starts setting is
    covered without editing this test."""
    keda = _render({"autoscaling": {"mode": "keda"}}, KEDA_APIS)
    names = set().union(*(_names_set_beside_the_config_map(r) for r in all_rendered.values()))
    names |= _names_set_beside_the_config_map(keda)
    assert {"OTEL_SDK_DISABLED", "OTEL_RESOURCE_ATTRIBUTES", "KEDA_REDIS_PASSWORD"} <= names
    refusals = {n: _refusal({**FIXED_JWT, "config": {"extraEnv": {n: "x"}}}) for n in names}
    accepted = sorted(n for n, refusal in refusals.items() if refusal is None)
    assert all("already set by the chart" in r for r in refusals.values() if r is not None)
    assert not accepted, f"config.extraEnv accepts names a container's env overrides: {accepted}"


# --- secrets: no cheap password digest outside Secrets ------------------------------------


def test_datastore_passwords_leave_no_digest_outside_secrets() -> None:
    """A user-chosen `redis.password` / `postgresql.password` must not land, as an unsalted
    SHA-256, in pod-template annotations: readable by the `view` role (which excludes Secrets),
    and a dictionary attack on a human password is instant."""
    redis_password, pg_password = "Summer2026!", "correct-horse-battery"
    rendered = _render(
        {
            **FIXED_JWT,
            "redis": {"password": redis_password},
            "postgresql": {"password": pg_password},
        }
    )
    digests = {
        hashlib.sha256(text.encode()).hexdigest(): label
        for text, label in (
            (redis_password, "sha256(redis.password)"),
            (pg_password, "sha256(postgresql.password)"),
            (f"{redis_password}/{pg_password}", "sha256(redis.password/postgresql.password)"),
        )
    }
    leaks = []
    for obj in rendered.objects:
        if obj["kind"] == "Secret":
            continue
        text = yaml.safe_dump({k: v for k, v in obj.items() if k != "__template__"})
        leaks += [
            f"{obj['kind']}/{obj['metadata']['name']}: {label}"
            for d, label in digests.items()
            if d in text
        ]
    assert not leaks, f"unsalted password digests outside Secrets: {leaks}"


@pytest.mark.parametrize(
    "values",
    [
        {"auth": {"secret": "our-company-jwt-secret-2026-winter!!"}},
        {
            **FIXED_JWT,
            "postgresql": {"enabled": False},
            "externalDatabase": {"url": "postgresql://app:Summer2026!@db.example:5432/app"},
        },
    ],
    ids=["auth.secret", "externalDatabase.url"],
)
def test_inline_secrets_leave_no_plain_digest_of_their_manifest(values: dict[str, Any]) -> None:
    """`checksum/secret` was the SHA-256 of the rendered secrets.yaml: every other byte of it
    (labels, names, chart version) can be read off the pods, so a guess of `auth.secret` or of
    an inline URL's password is checked offline like a plain hash."""
    manifests = render(values)
    (text,) = [t for path, t in manifests.items() if path.endswith("/secrets.yaml")]
    digest = hashlib.sha256(text.encode()).hexdigest()
    rendered = parse("promises", values, manifests)
    holders = [
        obj["metadata"]["name"]
        for obj in rendered.objects
        if obj["kind"] != "Secret" and digest in yaml.safe_dump(clean(obj))
    ]
    assert not holders, f"sha256 of the rendered secrets.yaml in {holders}"
    api = rendered.get("Deployment", "ao-agent-orchestrator-api")
    assert "checksum/secret" in api["spec"]["template"]["metadata"]["annotations"]


# --- the in-chart PostgreSQL never learns a changed password ---------------------------


def test_changing_postgresql_password_is_warned_and_documented() -> None:
    """POSTGRES_PASSWORD applies only at initdb: an upgrade that sets `postgresql.password`
    rolls the api and worker onto a password the server does not have. NOTES.txt must say so
    on such an upgrade (not on an install), and docs/kubernetes.md give the ALTER ROLE step."""
    values = {**FIXED_JWT, "postgresql": {"password": "b" * 32}}
    upgrade = _render(values, upgrade=True).notes
    assert "postgresql.password" in upgrade, upgrade
    assert "ALTER ROLE" in upgrade, upgrade
    assert "ALTER ROLE" not in _render(values).notes, "an install has no old password to keep"
    doc = DOC.read_text()
    assert "psql -U orchestrator -d orchestrator -c '\\password orchestrator'" in doc
    assert '--set-string "postgresql.password=$NEW_PASSWORD"' in doc


# --- config.historyRetentionDays is enforced by a CronJob ---------------------------------


def _prune_container(rendered: Rendered) -> dict[str, Any]:
    cronjob = rendered.get("CronJob", PRUNE)
    containers: list[dict[str, Any]] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ]
    (container,) = containers
    return container


def test_history_retention_is_enforced_by_a_prune_cronjob() -> None:
    """Only `orchestrator prune` deletes history older than historyRetentionDays: the chart
    runs it on `prune.schedule`, never twice at once, with the ConfigMap's retention."""
    values = {**FIXED_JWT, "config": {"historyRetentionDays": 7}}
    values["prune"] = {"schedule": "5 4 * * *", "timeZone": "Europe/Paris"}
    rendered = _render(values)
    assert (
        rendered.get("ConfigMap", CONFIG_MAP)["data"]["ORCHESTRATOR_HISTORY_RETENTION_DAYS"] == "7"
    )
    cronjob = rendered.get("CronJob", PRUNE)
    spec = cronjob["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("5 4 * * *", "Europe/Paris")
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    container = _prune_container(rendered)
    assert container["args"] == ["orchestrator", "prune"]
    assert container["envFrom"] == [{"configMapRef": {"name": CONFIG_MAP}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["ORCHESTRATOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "ao-agent-orchestrator-postgresql",
        "key": "database-url",
    }
    worker = rendered.get("Deployment", "ao-agent-orchestrator-worker")
    assert container["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
    assert "orchestrator prune" in DOC.read_text()


def test_prune_reaches_postgresql_and_nothing_else(all_rendered: dict[str, Rendered]) -> None:
    """The default deny covers the prune pods: their own policy lets them out to DNS and
    PostgreSQL only, and the in-chart PostgreSQL lets them in."""
    rendered = all_rendered["default"]
    policy = rendered.get("NetworkPolicy", PRUNE)
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "prune"
    assert _egress_ports(policy) == {53, 5432}
    assert policy["spec"]["ingress"] == []
    postgresql = rendered.get("NetworkPolicy", "ao-agent-orchestrator-postgresql")
    (rule,) = postgresql["spec"]["ingress"]
    components = next(
        e["values"]
        for e in rule["from"][0]["podSelector"]["matchExpressions"]
        if e["key"] == "app.kubernetes.io/component"
    )
    assert "prune" in components
    external = all_rendered["production"]
    assert _egress_ports(external.get("NetworkPolicy", PRUNE)) == {53, 5432}


def test_prune_needs_a_database_and_can_be_turned_off(all_rendered: dict[str, Rendered]) -> None:
    assert not all_rendered["minimal"].of_kind("CronJob"), "no database, nothing to prune"
    assert not _render({**FIXED_JWT, "prune": {"enabled": False}}).of_kind("CronJob")
    production = all_rendered["production"]
    env = {e["name"]: e for e in _prune_container(production)["env"]}
    assert (
        env["ORCHESTRATOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"]
        == (production.values["externalDatabase"]["existingSecret"])
    )


def test_prune_cronjob_name_leaves_room_for_its_jobs() -> None:
    """The API server refuses a CronJob name over 52 characters (its Jobs append 11); other
    objects may use 63."""
    values = {**FIXED_JWT, "fullnameOverride": "a" * 63}
    (cronjob,) = _render(values).of_kind("CronJob")
    assert len(cronjob["metadata"]["name"]) <= 52
    assert cronjob["metadata"]["name"].endswith("-prune")


# --- the documented shell commands run as pasted -------------------------------------------


def test_evaluation_install_command_survives_a_nomatch_shell(tmp_path: Path) -> None:
    """`--set exposure.ingress.hosts[0].host=...` unquoted: `[0]` is a glob, and zsh (macOS's
    default shell) refuses the whole command with "no matches found". Bash's `failglob` is the
    same rule; `helm` is a function here that prints what it would get."""
    block = next(b for b in _sh_blocks() if "helm install chat" in b and "--set" in b)
    script = "helm() { printf '%s\\n' \"$@\"; }\n" + block.split("helm test")[0]
    result = subprocess.run(
        ["bash", "-O", "failglob", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    failure = f"the documented command does not run in a nomatch shell: {result.stderr.strip()}"
    assert result.returncode == 0, failure
    assert "exposure.ingress.hosts[0].host=chat.example.local" in result.stdout, failure


def test_production_install_creates_the_namespace_it_uses() -> None:
    """`kubectl -n chat create secret ...` on a fresh cluster fails with `namespaces "chat"
    not found` unless something in the block creates the namespace first."""
    block = next(b for b in _sh_blocks() if "create secret generic orchestrator-jwt" in b)
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    creates = re.compile(r"create (?:namespace|ns) chat\b|--create-namespace")
    created = False
    for command in commands:
        uses = re.search(r"(?:-n|--namespace)[ =]chat\b", command) is not None
        assert not uses or created or creates.search(command), f"`{command[:70]}` before the ns"
        created = created or creates.search(command) is not None


# --- values.schema.json refuses what the processes refuse ---------------------------------

# Every numeric value the chart writes into the settings ConfigMap, and its Settings field.
NUMERIC_SETTINGS = {
    ("config", "maxWebsocketConnections"): "max_websocket_connections",
    ("config", "websocketPingInterval"): "websocket_ping_interval",
    ("config", "websocketPingTimeout"): "websocket_ping_timeout",
    ("config", "callbackPartitions"): "callback_partitions",
    ("config", "historyRetentionDays"): "history_retention_days",
    ("config", "validationCacheTtl"): "validation_cache_ttl",
    ("config", "metricsPort"): "metrics_port",
    ("api", "drain", "seconds"): "drain_seconds",
    ("executor", "concurrency"): "executor_concurrency",
    ("executor", "chunkDelayMs"): "executor_chunk_delay_ms",
    ("externalRedis", "maxConnections"): "redis_max_connections",
}


def _field_bounds(name: str) -> tuple[float | None, float | None, bool]:
    """(lowest, highest, lowest excluded) of a Settings field, from its Field(ge/gt/le/lt)."""
    low: float | None = None
    high: float | None = None
    exclusive = False
    for rule in Settings.model_fields[name].metadata:
        if isinstance(rule, Ge):
            low = float(rule.ge)  # type: ignore[arg-type]
        elif isinstance(rule, Gt):
            low, exclusive = float(rule.gt), True  # type: ignore[arg-type]
        elif isinstance(rule, Le):
            high = float(rule.le)  # type: ignore[arg-type]
        elif isinstance(rule, Lt):
            high = float(rule.lt)  # type: ignore[arg-type]
    return low, high, exclusive


def _schema_node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node = schema
    for key in path:
        node = node["properties"][key]
    return node


def test_every_numeric_setting_of_the_config_map_is_bounded_here(
    chart_values: dict[str, Any],
) -> None:
    """NUMERIC_SETTINGS lists every number the chart writes into the ConfigMap, so that the
    next test checks them all."""
    data = _render(FIXED_JWT).get("ConfigMap", CONFIG_MAP)["data"]
    numeric = set()
    for key in data:
        field = key.removeprefix(ENV_PREFIX).lower()
        annotation = (
            Settings.model_fields[field].annotation if field in Settings.model_fields else None
        )
        if annotation in (int, float):
            numeric.add(field)
    assert numeric == set(NUMERIC_SETTINGS.values())


@pytest.mark.parametrize("path", list(NUMERIC_SETTINGS), ids=".".join)
def test_schema_bounds_are_within_the_settings_bounds(
    path: tuple[str, ...], chart_schema: dict[str, Any]
) -> None:
    """A value the schema accepts and the Settings refuse installs, then every pod exits 2 at
    start on its own ConfigMap and the rollout stalls (maxUnavailable 0)."""
    low, high, exclusive = _field_bounds(NUMERIC_SETTINGS[path])
    node = _schema_node(chart_schema, path)
    where = ".".join(path)
    if high is not None:
        assert node.get("maximum", float("inf")) <= high, f"{where}: maximum {high}"
    if low is not None:
        schema_low = node.get("exclusiveMinimum", node.get("minimum", float("-inf")))
        assert schema_low >= low, f"{where}: minimum {low}"
        if exclusive and schema_low == low:
            assert "exclusiveMinimum" in node, f"{where}: must exclude {low}"


def _nested(path: tuple[str, ...], value: float) -> dict[str, Any]:
    values: dict[str, Any] = {path[-1]: value}
    for key in reversed(path[:-1]):
        values = {key: values}
    return values


@pytest.mark.parametrize("path", list(NUMERIC_SETTINGS), ids=".".join)
def test_the_schemas_maximum_starts_the_processes(
    path: tuple[str, ...], chart_schema: dict[str, Any], tmp_path: Path
) -> None:
    """The highest value the schema takes (one more is refused), rendered into the ConfigMap,
    is loaded by a real `orchestrator` process as the pods get it (a two-hour drain window or a
    two-day validation cache used to pass the schema, then stop every pod at start)."""
    maximum = _schema_node(chart_schema, path)["maximum"]
    values = _nested(path, maximum)
    chart = Chart.load(CHART_DIR)
    try:
        chart.validate_schema(values)
        with pytest.raises(HelmError):
            chart.validate_schema(_nested(path, maximum + 1))
    finally:
        chart.close()
    rendered = _render({**values, **FIXED_JWT})
    settings = dict(rendered.get("ConfigMap", CONFIG_MAP)["data"])
    tiers = rendered.get("ConfigMap", "ao-agent-orchestrator-tiers")["data"]["tiers.json"]
    (tmp_path / "tiers.json").write_text(tiers)
    settings["ORCHESTRATOR_TIERS_FILE"] = str(tmp_path / "tiers.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(settings, ORCHESTRATOR_JWT_SECRET=FIXED_JWT["auth"]["secret"])
    result = subprocess.run(
        [ORCHESTRATOR, "token", "--tenant", "t", "--user", "u"],  # loads the settings first
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, f"{values} rendered; the process refuses it: {result.stderr}"
