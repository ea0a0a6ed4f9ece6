"""The api's Request: a JSON body whose strings hold a lone UTF-16 surrogate is read with each
made U+FFFD (services/core/lone_surrogates.py) instead of refused as malformed."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import SerializationException

from services.core.lone_surrogates import decode_repaired, is_surrogate_error


class JsonRequest(Request[Any, Any, Any]):
    async def json(self) -> Any:
        try:
            return await super().json()
        except SerializationException as refused:
            if not is_surrogate_error(refused):
                raise
            try:
                value = decode_repaired(await self.body())
            except ValueError:
                raise refused from None
            self._json = value
            return value
