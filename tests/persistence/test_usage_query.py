"""`GET /api/usage?from=&to=` takes `YYYY-MM-DD` days (README); anything else is a 422."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidInput
from services.persistence.history import parse_day


@pytest.mark.parametrize("value", ["2026-W01-1", "2026-W53-7"])
def test_an_iso_week_date_is_not_a_yyyy_mm_dd_day(value: str) -> None:
    """Python 3.11's `date.fromisoformat` also reads ISO week dates, which are 10 characters
    long like YYYY-MM-DD: `from=2026-W01-1` is silently answered for 2025-12-29."""
    with pytest.raises(InvalidInput, match="from must be a date"):
        parse_day(value, "from")
