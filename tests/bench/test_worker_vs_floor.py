"""`bench/worker_vs_floor.py` with tiny numbers: both sides take every event of the load into
the session logs (the comparison raises on a missing or extra one), their figures are
printed, and no process it started is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import running

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(180)
def test_both_sides_log_every_event_and_nothing_is_left_running(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.worker_vs_floor", "--rate", "400", "--seconds", "1",
         "--pairs", "1", "--partitions", "4", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=170, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())

    (run,) = results["runs"]
    for side in ("worker", "floor"):
        assert run[side]["events"] == 400
        assert run[side]["cores"] > 0
        assert run[side]["p99_ms"] >= run[side]["p50_ms"]
    assert results["cores_ratio"] > 0
    assert "worker / floor CPU" in done.stdout
    assert {"worker", "floor"} <= {line.split()[1] for line in done.stdout.splitlines()[2:4]}
    assert len(results["processes"]) == 3  # Redis, the worker, the floor
    assert not [pid for pid in results["processes"] if running(pid)]
