"""The TierQuota CRD: a structural schema that accepts the examples and refuses bad resources.

The CRD file itself is the subject: its openAPIV3Schema is converted to JSON Schema (nullable
and the `x-kubernetes-*` extensions mapped, unknown fields refused as `kubectl`'s strict field
validation does) and checked with `jsonschema`; its CEL rules are evaluated with cel-python.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import msgspec
import pytest
import yaml

from services.core.tiers import DEFAULT_TIERS, LIMIT_KEYS, TierLimits
from services.operator.handlers import GROUP, PLURAL, VERSION
from services.operator.spec import InvalidSpec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "charts" / "agent-orchestrator" / "crds" / "tierquotas.yaml"
EXAMPLES = sorted((ROOT / "k8s" / "tierquotas").glob("*.yaml"))
SCHEMA_KEYWORDS = ("anyOf", "allOf", "oneOf")
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def load_crd() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return document


def served_version(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    assert isinstance(version, dict)
    return version


def open_api_schema() -> dict[str, Any]:
    schema: dict[str, Any] = served_version(load_crd())["schema"]["openAPIV3Schema"]
    return schema


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (Kubernetes' structural subset) to a JSON Schema `jsonschema` enforces."""
    out: dict[str, Any] = {
        key: value
        for key, value in node.items()
        if not key.startswith("x-kubernetes-")
        and key not in ("nullable", "properties", "items", *SCHEMA_KEYWORDS)
    }
    if "properties" in node:
        out["properties"] = {name: to_json_schema(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # pruned by the server, refused by kubectl
    if "items" in node:
        out["items"] = to_json_schema(node["items"])
    for keyword in SCHEMA_KEYWORDS:
        if keyword in node:
            out[keyword] = [to_json_schema(sub) for sub in node[keyword]]
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


VALIDATOR = jsonschema.Draft7Validator(to_json_schema(open_api_schema()))


def errors_of(resource: dict[str, Any]) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(resource)]


def example_resources() -> list[dict[str, Any]]:
    resources = []
    for path in EXAMPLES:
        resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return resources


def resource(**spec: Any) -> dict[str, Any]:
    base = {"tenantId": "acme", "tier": "pro"}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TierQuota",
        "metadata": {"name": "acme"},
        "spec": {**base, **spec},
    }


def without(field: str) -> dict[str, Any]:
    body = resource()
    del body["spec"][field]
    return body


def walk(node: Any, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}")
    if "items" in node:
        found += walk(node["items"], f"{path}[]")
    for keyword in SCHEMA_KEYWORDS:
        for index, sub in enumerate(node.get(keyword, [])):
            found += walk(sub, f"{path}.{keyword}[{index}]")
    return found


def test_the_crd_names_the_resource_of_the_design() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("TierQuota", PLURAL, ["tq"])
    version = served_version(crd)
    assert (version["name"], version["served"], version["storage"]) == (VERSION, True, True)
    assert version["subresources"] == {"status": {}}


def test_there_are_examples_and_every_one_is_accepted() -> None:
    resources = example_resources()
    assert len(resources) >= 4
    for body in resources:
        assert body["apiVersion"] == f"{GROUP}/{VERSION}"
        assert body["kind"] == "TierQuota"
        assert errors_of(body) == [], body["metadata"]["name"]


def test_every_example_is_also_accepted_by_the_operator() -> None:
    for body in example_resources():
        parse_spec(body["spec"], DEFAULT_TIERS)


@pytest.mark.parametrize(
    "body",
    [
        resource(tenantId="bad tenant!"),
        resource(tenantId=""),
        resource(tenantId="x" * 65),
        without("tenantId"),
        without("tier"),
        resource(tier="no spaces allowed"),
        resource(limits={"maxConnections": -1}),
        resource(limits={"requestsPerMinutePerSession": 0}),
        resource(limits={"requestsPerMinutePerTenant": "fast"}),
        resource(limits={"taskTimeoutSeconds": 1.5}),
        resource(limits={"tokensPerDay": 0}),
        resource(limits={"tokensPerDay": -5}),
        resource(limits={"tokensPerDay": "lots"}),
        resource(limits={"priority": "urgent"}),
        resource(limits={"streaming": "yes"}),
        resource(limits={"burst": 3}),
        resource(allowedAgents=["not ok"]),
        resource(allowedAgents="support"),
        resource(extra="field"),
    ],
    ids=lambda body: str(body.get("spec"))[:60],
)
def test_invalid_resources_are_rejected(body: dict[str, Any]) -> None:
    assert errors_of(body) != []


@pytest.mark.parametrize(
    "limits",
    [
        {"tokensPerDay": "unlimited"},
        {"tokensPerDay": None},
        {"tokensPerDay": 1},
        {"streaming": False, "priority": "low", "maxMessageChars": 1},
        {},
    ],
)
def test_valid_limits_are_accepted(limits: dict[str, Any]) -> None:
    assert errors_of(resource(limits=limits)) == []


def test_an_unknown_tier_name_is_left_to_the_operator_which_refuses_it() -> None:
    # Tiers are deployment configuration (ORCHESTRATOR_TIERS): a CRD in crds/ cannot follow
    # them, so the schema checks the name's form and the operator checks that it exists.
    assert errors_of(resource(tier="platinum")) == []
    with pytest.raises(InvalidSpec, match="'platinum' is not a configured tier"):
        parse_spec(resource(tier="platinum")["spec"], DEFAULT_TIERS)


def test_the_limits_in_the_schema_are_exactly_the_limits_of_the_code() -> None:
    spec = open_api_schema()["properties"]["spec"]["properties"]
    assert tuple(spec["limits"]["properties"]) == LIMIT_KEYS
    effective = open_api_schema()["properties"]["status"]["properties"]["effective"]
    assert set(effective["properties"]) == {"tier", "allowedAgents", *LIMIT_KEYS}


def test_the_schema_is_structural() -> None:
    for path, node in walk(open_api_schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert node.get("anyOf") == INT_OR_STRING, path
            continue
        for keyword in SCHEMA_KEYWORDS:
            for sub in node.get(keyword, []):
                assert not {"type", "properties", "items"} & set(sub), path
        if "." in path and not any(k in path for k in SCHEMA_KEYWORDS):
            assert "type" in node, f"{path} has no type"
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"]["required"]), path


def test_status_keeps_kopfs_own_fields() -> None:
    status = open_api_schema()["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["kopf"]["x-kubernetes-preserve-unknown-fields"] is True


def test_printer_columns_point_at_fields_of_the_schema() -> None:
    columns = served_version(load_crd())["additionalPrinterColumns"]
    names = [column["name"] for column in columns]
    assert names == [
        "Tenant",
        "Tier",
        "RPM",
        "Connections",
        "Tokens today",
        "Ready",
        "Reason",
        "Age",
    ]
    schema = open_api_schema()
    for column in columns:
        path = column["jsonPath"].split("[", 1)[0].strip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            node = node["properties"][part]
        assert node, column["name"]


def cel_rules() -> list[tuple[str, str]]:
    return [
        (path, rule["rule"])
        for path, node in walk(open_api_schema())
        for rule in node.get("x-kubernetes-validations", [])
    ]


def cel(rule: str, **variables: Any) -> bool:
    environment = celpy.Environment()
    program = environment.program(environment.compile(rule))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in variables.items()}))


def test_every_cel_rule_compiles() -> None:
    rules = cel_rules()
    assert len(rules) >= 2
    for _, rule in rules:
        celpy.Environment().compile(rule)


def test_the_tenant_id_cannot_change() -> None:
    (rule,) = [rule for path, rule in cel_rules() if path.endswith(".tenantId")]
    assert cel(rule, self="acme", oldSelf="acme")
    assert not cel(rule, self="globex", oldSelf="acme")


def test_a_session_cannot_be_allowed_more_than_its_tenant() -> None:
    (rule,) = [rule for path, rule in cel_rules() if path.endswith(".limits")]
    session, tenant = "requestsPerMinutePerSession", "requestsPerMinutePerTenant"
    assert cel(rule, self={session: 10, tenant: 100})
    assert cel(rule, self={session: 100})  # the other one is the tier's
    assert cel(rule, self={})
    assert not cel(rule, self={session: 101, tenant: 100})
    for body in example_resources():
        assert cel(rule, self=copy.deepcopy(body["spec"].get("limits", {})))


@pytest.mark.parametrize("kubernetes_version", ["1.30.0", "1.37.0"])
def test_the_crd_files_are_valid_kubernetes_objects(kubernetes_version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for path in sorted(CRD_FILE.parent.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(document, kubernetes_version, strict=True)


def _integer_bounds(node: dict[str, Any]) -> tuple[int | None, int | None]:
    for option in [node, *node.get("anyOf", []), *node.get("oneOf", [])]:
        if "minimum" in option or "maximum" in option:
            return option.get("minimum"), option.get("maximum")
    return None, None


def test_the_schemas_bound_every_limit_as_the_code_does() -> None:
    """A limit the CRD (or the chart's `tiers`) accepts but the code refuses would leave the
    TierQuota Invalid or stop the api at start; beyond the code's bounds a rate limit overflowed
    the limiter's replies and a task timeout made every send a 500."""
    info = msgspec.inspect.type_info(TierLimits)
    assert isinstance(info, msgspec.inspect.StructType)
    expected: dict[str, tuple[int | None, int | None]] = {}
    for field in info.fields:
        options = getattr(field.type, "types", (field.type,))
        for option in options:
            if isinstance(option, msgspec.inspect.IntType):
                expected[field.encode_name] = (option.ge, option.le)
    assert set(expected) == set(LIMIT_KEYS) - {"streaming", "priority"}
    crd = open_api_schema()["properties"]["spec"]["properties"]["limits"]["properties"]
    chart = json.loads((ROOT / "charts/agent-orchestrator/values.schema.json").read_text())
    tiers = chart["properties"]["tiers"]["additionalProperties"]["properties"]
    for key, bounds in expected.items():
        assert bounds[1] is not None, f"{key} has no upper bound"
        assert _integer_bounds(crd[key]) == bounds, key
        assert _integer_bounds(tiers[key]) == bounds, key
