"""Identifiers: every id that ends up in a Redis key is checked against one pattern."""

from __future__ import annotations

import re
import secrets
from typing import Annotated

import msgspec

# Python's `$` also matches before a final newline, so "s1\n" would pass and reach a key;
# `(?!\n)` closes that. Valid ECMA-262 too (OpenAPI, browsers), where `$` is the end already.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$(?!\n)"
# What the AES schemas (schemas/*.json) and the OpenAPI document publish, while the runtime
# checks ID_PATTERN: the same set in every regex dialect, including RE2 (Go), which has no
# lookahead.
PORTABLE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_ID_RE = re.compile(ID_PATTERN)

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, description="[A-Za-z0-9_-]{1,64}")]


def is_valid_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


def new_id() -> str:
    """A 22-character url-safe random id (128 bits), valid under `ID_PATTERN`."""
    return secrets.token_urlsafe(16)
