"""The operator's own knobs (`ORCHESTRATOR_OPERATOR_*`), read once at start.

Kept apart from `services.core.settings` because no other process reads them; a bad value
stops the operator with one line naming the variable, like every other setting.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.settings import ENV_PREFIX, ConfigError

OPERATOR_PREFIX = f"{ENV_PREFIX}OPERATOR_"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
MAX_PRIORITY = 999_999
"""Replicas draw a random peering priority in [1, MAX_PRIORITY]; see `OperatorSettings`."""


class OperatorSettings(BaseSettings):
    """How and where the operator runs.

    `namespaces` empty means every namespace (needs a ClusterRole). Peering: the replica with
    the highest priority acts and the others pause (kopf pauses *every* operator that sees a
    peer of equal priority), so by default each replica draws a random priority; a developer's
    operator started with `--priority` above `MAX_PRIORITY` pauses the in-cluster ones.
    """

    model_config = SettingsConfigDict(
        env_prefix=OPERATOR_PREFIX, case_sensitive=False, extra="ignore", frozen=True
    )

    namespaces: Annotated[list[str], NoDecode] = []
    peering: bool = True
    peering_name: str = "agent-orchestrator"
    priority: int | None = Field(None, ge=0)
    liveness_port: int = Field(8080, ge=0, le=65535)  # 0: no liveness endpoint
    refresh_seconds: float = Field(60.0, ge=1.0)  # usage timer and level reconcile

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        for namespace in value:
            require_dns_label(namespace)
        return list(dict.fromkeys(value))

    @field_validator("peering_name")
    @classmethod
    def _peering_name(cls, value: str) -> str:
        return require_dns_label(value)

    @property
    def contender_ttl(self) -> float:
        """How long a contender is reported without renewing (it renews every refresh)."""
        return 3 * self.refresh_seconds


def require_dns_label(value: str) -> str:
    if not DNS_LABEL.match(value):
        raise ValueError(f"{value[:80]!r} is not a valid Kubernetes name (lowercase DNS label)")
    return value


def load_operator_settings(**overrides: Any) -> OperatorSettings:
    try:
        return OperatorSettings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = [str(part) for part in error.get("loc", ()) if isinstance(part, str | int)]
        name = OPERATOR_PREFIX + (location[0].upper() if location else "")
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}") from None
