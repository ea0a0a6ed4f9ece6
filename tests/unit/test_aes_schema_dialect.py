"""schemas/ as an AES team loads them: with a strict JSON Schema 2020-12 validator (Ajv in
Node refuses any keyword outside the dialect a file declares), and against what the worker
really decodes: a callback the schema admits must not be dead-lettered, and one it refuses
must not be read either."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from services.core.actions import MAX_SAFE_INTEGER, MalformedAction, decode_callback

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# Every keyword of JSON Schema 2020-12 (core, applicator, unevaluated, validation, meta-data,
# format-annotation and content vocabularies). Anything else is unknown to the dialect the
# files declare in `$schema`: Ajv refuses such a schema in its default (strict) mode.
KEYWORDS_2020_12 = {
    "$schema", "$id", "$ref", "$defs", "$anchor", "$dynamicRef", "$dynamicAnchor",
    "$comment", "$vocabulary",
    "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas",
    "prefixItems", "items", "contains", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
    "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
    "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
    "required", "dependentRequired",
    "title", "description", "default", "deprecated", "readOnly", "writeOnly", "examples",
    "format", "contentEncoding", "contentMediaType", "contentSchema",
}  # fmt: skip
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = (
    "items", "additionalProperties", "not", "if", "then", "else", "contains",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
)  # fmt: skip


def unknown_keywords(schema: Any, where: str = "#") -> list[str]:
    """`where: keyword` for each keyword outside 2020-12, walking only schema positions (a
    property *named* like a keyword is not one)."""
    if not isinstance(schema, dict):
        return []
    found = [f"{where}: {key}" for key in schema if key not in KEYWORDS_2020_12]
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            found += unknown_keywords(sub, f"{where}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for n, sub in enumerate(schema.get(key) or []):
            found += unknown_keywords(sub, f"{where}/{key}/{n}")
    for key in _SCHEMA_ONE:
        found += unknown_keywords(schema.get(key), f"{where}/{key}")
    return found


SCHEMA_FILES = sorted(path.name for path in SCHEMAS.glob("*.json"))


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_every_schema_speaks_only_the_dialect_it_declares(name: str) -> None:
    """Each file declares `$schema` 2020-12. actions.json (the union an AES validates any
    entry with) carried `discriminator`, an OpenAPI keyword msgspec emits for tagged unions:
    not JSON Schema, so Ajv's default (strict) `new Ajv2020().compile(...)` threw `strict
    mode: unknown keyword: "discriminator"` on the whole file."""
    schema = json.loads((SCHEMAS / name).read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert unknown_keywords(schema) == []


def _chunk(**fields: Any) -> dict[str, Any]:
    return {
        "action_type": "execution.chunk",
        "tenant_id": "t1",
        "session_id": "s1",
        "task_id": "task1",
        "attempt": 1,
        "seq": 1,
        "delta": "hi",
        **fields,
    }


# Integers at the edge of what every JSON reader keeps exact: `seq` had no maximum in the
# schema (1e20 is an integer to JSON Schema 2020-12) while the worker read no more than 64
# bits, so a schema-valid chunk was dead-lettered.
EDGES = {
    "largest_safe_seq": _chunk(seq=MAX_SAFE_INTEGER),
    "seq_past_safe": _chunk(seq=MAX_SAFE_INTEGER + 1),
    "seq_1e20": _chunk(seq=1e20),
    "attempt_past_safe": _chunk(attempt=MAX_SAFE_INTEGER + 1),
}


@pytest.mark.parametrize("callback", EDGES.values(), ids=EDGES.keys())
def test_the_schema_and_the_worker_agree_on_a_callbacks_integers(callback: dict[str, Any]) -> None:
    """What the worker's partition loop does with each callback entry (`decode_callback`,
    services/worker/partition.py): a `MalformedAction` there is dead-lettered."""
    schema = json.loads((SCHEMAS / "execution.chunk.json").read_text())
    admitted = Draft202012Validator(schema).is_valid(callback)
    try:
        decode_callback(json.dumps(callback))
    except MalformedAction:
        read = False
    else:
        read = True
    assert admitted == read, f"schema admits: {admitted}, worker reads: {read}"
