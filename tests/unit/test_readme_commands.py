"""README's promises about `make test` against the Makefile that runs it: what a developer
reads before typing the command is what it installs and runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def debian_packages_installed_by_make_test() -> set[str]:
    """The Debian packages the prerequisites of the Makefile's `test` target apt-get install."""
    makefile = (ROOT / "Makefile").read_text()
    (prerequisites,) = re.findall(r"^test:(.*)$", makefile, flags=re.MULTILINE)
    packages: set[str] = set()
    for target in prerequisites.split():
        recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
        if recipe is None:
            continue
        for install in re.findall(
            r"apt-get install ([^;]*);", recipe.group(1).replace("\\\n", " ")
        ):
            packages.update(word for word in install.split() if not word.startswith("-"))
    return packages


def test_the_two_commands_name_every_package_make_test_installs() -> None:
    """README "Two commands" tells what `make test` installs when missing ("Debian's Chromium
    for the browser tests and Debian's Prometheus for the monitoring tests"); the Makefile's
    `test` target also installs `nginx-light` (the `ingress` prerequisite, tests/ingress), as
    the Development section says but the first thing a developer reads does not."""
    installed = debian_packages_installed_by_make_test()
    assert installed == {"chromium", "prometheus", "nginx-light"}, installed
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```", 2)[1]
    comment = " ".join(line.split("#", 1)[1] for line in block.splitlines() if "#" in line).lower()
    missing = sorted(p for p in ("chromium", "prometheus", "nginx") if p not in comment)
    assert missing == [], f"README's `make test` line does not mention {missing}: {comment!r}"
