"""Guard: README "Configuration" lists every `Settings` field, and each documented default is
the one the processes use (no other test compares the table with the code)."""

from __future__ import annotations

import re
from enum import Enum

from services.core.settings import Settings
from tests.integration.start_checks import ROOT

NO_DEFAULT = {"\u2013", "-", "empty", "hostname-pid"}  # \u2013: the table's en dash


def _rows() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("## Commands", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = re.findall(r"`([A-Z_]+)`", cells[0])
        defaults = [d.strip().strip("`") for d in cells[1].split("/")]
        for index, name in enumerate(names):
            rows.append((name, defaults[min(index, len(defaults) - 1)]))
    return rows


def test_readme_configuration_table_matches_the_settings() -> None:
    fields = Settings.model_fields
    documented = {name.lower() for name, _ in _rows()}
    assert set(fields) == documented, set(fields) ^ documented
    wrong = []
    for name, doc in _rows():
        default = fields[name.lower()].default
        if doc in NO_DEFAULT:
            if default not in (None, []):
                wrong.append((name, doc, default))
            continue
        value = default.value if isinstance(default, Enum) else default
        if isinstance(value, bool):
            same = doc == str(value).lower()
        elif isinstance(value, int | float):
            same = float(doc) == float(value)
        else:
            same = doc == str(value)
        if not same:
            wrong.append((name, doc, default))
    assert not wrong, f"README default differs from the code: {wrong}"
