"""The tier model of DESIGN §5: named sets of limits, their built-in defaults and overrides.

Limits are camelCase wherever they leave Python (the `TierQuota` CRD's `spec.limits`,
`orchestrator tenants set --limit KEY=VALUE`, `ORCHESTRATOR_TIERS`, the quota store in Redis)
and snake_case inside it; msgspec's `rename="camel"` is the one mapping between the two, so a
new limit is one new field here and nothing else.

`tokensPerDay` is `None` (JSON `null`, CLI `unlimited`) for "no budget". Zero is refused rather
than read as "unlimited": a budget of 0 looks like "blocked" to a reader, and one spelling per
meaning keeps the CRD, the CLI and the store unambiguous.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from services.core.ids import Id, is_valid_id
from services.core.keys import Priority
from services.core.settings import ENV_PREFIX, ConfigError, Settings

# Upper bounds: a limit must stay a number every part can compute with. A rate limit of N per
# minute is a GCRA interval of 60 000 000 / N microseconds (1 us at the bound; beyond it the
# limiter's doubles overflow its integer replies); a task timeout becomes the action's deadline
# (a datetime); a budget is compared as a double in Lua (exact below 2**53).
MAX_PER_MINUTE = 60_000_000
MAX_CONNECTIONS = 10_000_000
MAX_TOKENS_PER_DAY = 10**15
MAX_MESSAGE_CHARS = 10_000_000
MAX_TASK_TIMEOUT_SECONDS = 7 * 86_400

PerMinute = Annotated[int, msgspec.Meta(ge=1, le=MAX_PER_MINUTE)]

TIERS_VARIABLE = f"{ENV_PREFIX}TIERS"
TIERS_FILE_VARIABLE = f"{ENV_PREFIX}TIERS_FILE"
DEFAULT_TIER_VARIABLE = f"{ENV_PREFIX}DEFAULT_TIER"
UNLIMITED_WORDS = frozenset({"unlimited", "none", "null"})


class LimitError(ValueError):
    """A limit value or key is invalid; the message names the camelCase key."""


class TierLimits(
    msgspec.Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True
):
    """Everything a tier (or a tenant's override of it) decides about a tenant's traffic."""

    requests_per_minute_per_session: PerMinute
    requests_per_minute_per_tenant: PerMinute
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=MAX_CONNECTIONS)]
    # None: unlimited
    tokens_per_day: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_PER_DAY)] | None
    # Capped by the process's ORCHESTRATOR_MAX_MESSAGE_CHARS (`QuotaStore.effective`).
    max_message_chars: Annotated[int, msgspec.Meta(ge=1, le=MAX_MESSAGE_CHARS)]
    streaming: bool
    priority: Priority
    task_timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=MAX_TASK_TIMEOUT_SECONDS)]
    allowed_agents: tuple[Id, ...] = ()  # empty: every agent

    def allows_agent(self, agent_id: str) -> bool:
        return not self.allowed_agents or agent_id in self.allowed_agents

    def to_dict(self) -> dict[str, Any]:
        """The camelCase form, as in the CRD and the store."""
        result: dict[str, Any] = msgspec.to_builtins(self)
        result["allowedAgents"] = list(self.allowed_agents)
        return result


def _expected_types() -> dict[str, msgspec.inspect.Type]:
    info = msgspec.inspect.type_info(TierLimits)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.encode_name: field.type for field in info.fields}


_EXPECTED = _expected_types()

ALLOWED_AGENTS_KEY = "allowedAgents"
LIMIT_KEYS: tuple[str, ...] = tuple(name for name in _EXPECTED if name != ALLOWED_AGENTS_KEY)
"""The keys of `spec.limits` and `--limit`, in DESIGN §5 order (allowed agents are separate)."""

DEFAULT_TIERS: Mapping[str, TierLimits] = {
    "free": TierLimits(
        requests_per_minute_per_session=10,
        requests_per_minute_per_tenant=30,
        max_connections=5,
        tokens_per_day=20_000,
        max_message_chars=2_000,
        streaming=False,
        priority="low",
        task_timeout_seconds=60,
    ),
    "pro": TierLimits(
        requests_per_minute_per_session=60,
        requests_per_minute_per_tenant=600,
        max_connections=200,
        tokens_per_day=2_000_000,
        max_message_chars=8_000,
        streaming=True,
        priority="normal",
        task_timeout_seconds=120,
    ),
    "enterprise": TierLimits(
        requests_per_minute_per_session=600,
        requests_per_minute_per_tenant=6000,
        max_connections=5000,
        tokens_per_day=None,
        max_message_chars=32_000,
        streaming=True,
        priority="high",
        task_timeout_seconds=300,
    ),
}


def _describe(expected: msgspec.inspect.Type) -> str:
    """What a value must look like, in the words of someone typing `--limit KEY=VALUE`."""
    if isinstance(expected, msgspec.inspect.UnionType):
        return " or ".join(_describe(option) for option in expected.types)
    if isinstance(expected, msgspec.inspect.IntType):
        if expected.ge is not None and expected.le is not None:
            return f"an integer from {expected.ge} to {expected.le}"
        return "an integer" + (f" >= {expected.ge}" if expected.ge is not None else "")
    if isinstance(expected, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(expected, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(str(value) for value in expected.values)
    if isinstance(expected, msgspec.inspect.NoneType):
        return "unlimited"
    return "a list of agent ids"


def _error_text(exc: msgspec.ValidationError) -> str:
    """msgspec's `Expected ... - at `$.key`` as `key must be ...`: the key first, one line."""
    message, _, where = str(exc).partition(" - at `$")
    key = where.removeprefix(".").split("[", 1)[0].rstrip("`")
    if key in _EXPECTED:
        return f"{key} must be {_describe(_EXPECTED[key])}"
    if message.startswith("Object contains unknown field"):
        return _unknown(message.rsplit("`", 2)[-2], _EXPECTED)
    return message[:1].lower() + message[1:]


def _unknown(key: str, known: Iterable[str]) -> str:
    return f"{key} is not a limit (known: {', '.join(known)})"


def merge_limits(base: TierLimits, overrides: Mapping[str, Any]) -> TierLimits:
    """`base` with the camelCase `overrides` applied; every value is checked (`LimitError`)."""
    if not overrides:
        return base
    merged = {**msgspec.to_builtins(base), **overrides}
    try:
        return msgspec.convert(merged, TierLimits)
    except msgspec.ValidationError as exc:
        raise LimitError(_error_text(exc)) from None


def validate_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Check a partial set of limits (no `allowedAgents`); return it with normalized values."""
    for key in overrides:
        if key not in LIMIT_KEYS:
            raise LimitError(_unknown(key, LIMIT_KEYS))
    checked = merge_limits(DEFAULT_TIERS["free"], overrides).to_dict()
    session, tenant = (
        checked.get(key) if key in overrides else None
        for key in ("requestsPerMinutePerSession", "requestsPerMinutePerTenant")
    )
    # The CRD's CEL rule, kept here too: `tenants set` and an operator on a cluster whose
    # CRD predates the rule stored a session rate the tenant's rate made unreachable, and
    # showed it as `effective`.
    if session is not None and tenant is not None and session > tenant:
        raise LimitError(
            f"requestsPerMinutePerSession ({session}) cannot exceed "
            f"requestsPerMinutePerTenant ({tenant})"
        )
    return {key: checked[key] for key in overrides}


def _word(text: str) -> Any:
    """A CLI word as the JSON value it most plausibly means; the struct decides if it fits."""
    lowered = text.strip().lower()
    if lowered in UNLIMITED_WORDS:
        return None
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    try:
        return int(lowered)
    except ValueError:
        return text.strip()


def parse_limit_overrides(items: Iterable[str], *, option: str = "--limit") -> dict[str, Any]:
    """Parse `KEY=VALUE` words (`requestsPerMinutePerTenant=100`, `tokensPerDay=unlimited`).

    Raises `ConfigError` naming the option and the offending word, the way the CLI reports
    every other bad argument.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, separator, raw = item.partition("=")
        key = key.strip()
        if not separator or not key or not raw.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{option} {item}: {_unknown(key, LIMIT_KEYS)}")
        if key in overrides:
            raise ConfigError(f"{option} {item}: {key} given twice")
        value = _word(raw)
        try:
            overrides.update(validate_overrides({key: value}))
        except LimitError as exc:
            raise ConfigError(f"{option} {item}: {exc}") from None
    return overrides


def parse_tiers_config(
    text: str,
    base: Mapping[str, TierLimits],
    *,
    variable: str,
    new_tier_defaults: Mapping[str, Any] | None = None,
) -> dict[str, TierLimits]:
    """Apply a JSON object `{"tier": {limits...}}` over `base`.

    A tier that exists is partially overridden; a new tier must define every limit (there is
    no good implicit base for it) but those of `new_tier_defaults` (the installation's
    `MAX_REQUESTS_PER_SESSION`). Errors are one-line `ConfigError`s naming `variable`.
    """
    try:
        document = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{variable}: not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ConfigError(f'{variable}: expected a JSON object like {{"free": {{...}}}}')
    tiers = dict(base)
    for name, limits in document.items():
        if not is_valid_id(name):
            raise ConfigError(f"{variable}: tier name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if not isinstance(limits, dict):
            raise ConfigError(f"{variable}: {name}: expected an object of limits")
        try:
            if name in tiers:
                tiers[name] = merge_limits(tiers[name], limits)
            else:
                tiers[name] = msgspec.convert({**(new_tier_defaults or {}), **limits}, TierLimits)
        except LimitError as exc:
            raise ConfigError(f"{variable}: tier {name!r}: {exc}") from None
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{variable}: tier {name!r}: {_error_text(exc)}") from None
    return tiers


def load_tiers(settings: Settings) -> dict[str, TierLimits]:
    """The tier table: built-in defaults, then `TIERS_FILE`, then inline `TIERS` on top.

    Called once at start by whoever builds the quota store, so a bad table stops the process
    with one line naming the variable. The configured default tier must exist.
    """
    tiers = dict(DEFAULT_TIERS)
    defaults = {"requestsPerMinutePerSession": settings.max_requests_per_session}
    if settings.tiers_file:
        try:
            text = Path(settings.tiers_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{TIERS_FILE_VARIABLE}: cannot read it ({exc.strerror})") from None
        tiers = parse_tiers_config(
            text, tiers, variable=TIERS_FILE_VARIABLE, new_tier_defaults=defaults
        )
    if settings.tiers:
        tiers = parse_tiers_config(
            settings.tiers, tiers, variable=TIERS_VARIABLE, new_tier_defaults=defaults
        )
    if settings.default_tier not in tiers:
        raise ConfigError(
            f"{DEFAULT_TIER_VARIABLE}: unknown tier {settings.default_tier!r}; "
            f"known: {', '.join(tiers)}"
        )
    return tiers
