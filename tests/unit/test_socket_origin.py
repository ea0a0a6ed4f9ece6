"""Which page origins may open a socket: the same answer as the CORS layer gives REST."""

from __future__ import annotations

from types import SimpleNamespace
from typing import cast

import pytest

from services.api.runtime import Runtime
from services.api.sockets import _origin_allowed
from services.core.settings import load_settings


def runtime_with(origins: str) -> Runtime:
    return cast(Runtime, SimpleNamespace(settings=load_settings(allowed_origins=origins)))


@pytest.mark.parametrize(
    ("origins", "origin", "allowed"),
    [
        ("", None, True),  # not a browser
        ("", "https://app.example", False),
        ("https://app.example", "https://app.example", True),
        ("https://app.example", "https://evil.example", False),
        # `*` opened REST to every page (Litestar's CORS) but no socket to any
        ("*", "https://evil.example", True),
    ],
)
def test_the_socket_origin_check_agrees_with_cors(
    origins: str, origin: str | None, allowed: bool
) -> None:
    assert _origin_allowed(runtime_with(origins), origin) is allowed
