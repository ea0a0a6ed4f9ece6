"""Summarize py-spy raw profiles (`--profile DIR` of bench/run.py): where the CPU went.

    python -m bench.profile_report DIR_OR_FILE... [--top 25] [--match services/]

For every file: the share of samples spent *in* each function (self) and *under* it
(inclusive, counted once per stack), so the lead can see both the hot leaves and which of our
functions they belong to. py-spy's raw format is one collapsed stack per line, frames joined
by `;` from the root, then the sample count.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append((frames.split(";"), int(count)))
    return stacks


def summarize(path: Path, top: int, match: str) -> str:
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    for frames, count in stacks:
        own[frames[-1]] += count
        for frame in set(frames):
            under[frame] += count
    lines = [f"== {path.name}: {total} samples"]
    lines.append("  self%  function")
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}  {frame}")
    lines.append(f"  incl%  function (matching {match!r})")
    shown = 0
    for frame, count in under.most_common():
        if match in frame:
            lines.append(f"  {100 * count / total:5.1f}  {frame}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="inclusive list: only frames containing")
    args = parser.parse_args(argv)
    files = [f for p in args.paths for f in (sorted(p.glob("*.txt")) if p.is_dir() else [p])]
    for path in files:
        print(summarize(path, args.top, args.match))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
