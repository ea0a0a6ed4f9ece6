"""JSON whose strings hold a lone UTF-16 surrogate (`"\\ud83d"`), read as a UTF-8 decoder reads
a bad byte: each lone one becomes U+FFFD.

RFC 8259 (8.2) allows such an escape, and a browser writes one whenever a page cuts text at n
UTF-16 units (`text.slice(0, n)` through an emoji) before `JSON.stringify`. msgspec refuses it
(nothing can encode it to UTF-8), so the send was answered "malformed JSON", blaming the
client's encoder, and a socket's `chat.send` lost its `request_id` with it. The stdlib json
keeps the surrogate (and joins a valid escaped pair); only lone ones remain to replace.
"""

from __future__ import annotations

import json
from typing import Any

_SURROGATES = range(0xD800, 0xE000)


def is_surrogate_error(error: BaseException) -> bool:
    """Whether msgspec refused the text for a lone surrogate (its words: "utf-16 surrogate")."""
    return "surrogate" in str(error)


def has_lone_surrogate(text: str) -> bool:
    return not text.isascii() and any(ord(char) in _SURROGATES for char in text)


def repaired_text(text: str) -> str:
    """`text` with each lone surrogate made U+FFFD."""
    if not has_lone_surrogate(text):
        return text
    return "".join("\ufffd" if ord(char) in _SURROGATES else char for char in text)


def _repaired(value: Any) -> Any:
    if isinstance(value, str):
        return repaired_text(value)
    if isinstance(value, list):
        return [_repaired(item) for item in value]
    if isinstance(value, dict):
        return {repaired_text(key): _repaired(item) for key, item in value.items()}
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # the stdlib's NaN/Infinity stay malformed


def decode_repaired(data: str | bytes) -> Any:
    """`data` decoded with each lone surrogate made U+FFFD; ValueError if it is not JSON."""
    return _repaired(json.loads(data, parse_constant=_refuse_constant))
