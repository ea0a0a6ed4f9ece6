"""JSON Schemas of the domain actions, generated from the code into `schemas/`.

Another team implements an AES against these files; a test fails when they are stale.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from services.core.actions import ACTION_TYPES, AnyAction
from services.core.ids import ID_PATTERN, PORTABLE_ID_PATTERN

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _tag(cls: type[msgspec.Struct]) -> str:
    return str(cls.__struct_config__.tag)


def _published(schema: Any) -> Any:
    """The schema as the files carry it: the id pattern every regex dialect reads (see
    `PORTABLE_ID_PATTERN`), and descriptions (the classes' docstrings) without their source
    indentation, which msgspec kept before 0.23 and strips since: the files must not depend
    on the msgspec version a fresh install picks (CI found them stale after 0.23 came out)."""
    if isinstance(schema, dict):
        published = {}
        for key, value in schema.items():
            if key == "pattern" and value == ID_PATTERN:
                published[key] = PORTABLE_ID_PATTERN
            elif key == "description" and isinstance(value, str):
                published[key] = inspect.cleandoc(value)
            else:
                published[key] = _published(value)
        return published
    if isinstance(schema, list):
        return [_published(item) for item in schema]
    return schema


def render_schemas() -> dict[str, str]:
    """File name -> JSON text: one schema per action type plus the union of all of them."""
    files: dict[str, str] = {}
    for cls in ACTION_TYPES:
        schema = _published(msgspec.json.schema(cls))
        schema = {"$schema": SCHEMA_DIALECT, "title": _tag(cls), **schema}
        files[f"{_tag(cls)}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    union = _published(msgspec.json.schema(AnyAction))
    # msgspec adds OpenAPI's `discriminator`, no keyword of the dialect declared above: Ajv
    # (a Node AES's validator) refuses the file in its default strict mode. Each type's
    # `action_type` enum already tells the `anyOf` branches apart.
    union.pop("discriminator", None)
    union = {"$schema": SCHEMA_DIALECT, "title": "action", **union}
    files["actions.json"] = json.dumps(union, indent=2, sort_keys=True) + "\n"
    return files


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def stale_schemas(directory: Path) -> list[str]:
    """Names of files that differ from what the code generates (missing ones included)."""
    stale = []
    for name, text in render_schemas().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
    return stale
