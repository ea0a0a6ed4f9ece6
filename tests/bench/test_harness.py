"""The benchmark harness itself, with tiny numbers: `python bench/run.py --smoke`.

It starts everything the real run starts (Redis, our api/worker/executor, python-socketio
servers, the echo floor, client fleets, the emitter, the chat floor), so a broken harness
fails here rather than in front of the lead. The figures are not judged, only their
presence and sanity; every process the run started must be gone when it returns.
"""

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
pytest.importorskip("socketio", reason="the peer needs the bench extra: pip install -e '.[bench]'")


def _positive(results: dict, path: str) -> float:
    value: object = results
    for part in path.split("."):
        assert isinstance(value, dict), f"{path}: {part!r} is not under an object"
        assert part in value, f"{path}: {part!r} missing"
        value = value[part]
    assert isinstance(value, int | float), f"{path} is {value!r}"
    assert value > 0, f"{path} is {value}"
    return float(value)


@pytest.mark.timeout(240)
def test_smoke_run_writes_every_figure_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    done = subprocess.run(
        [sys.executable, "bench/run.py", "--smoke", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())

    for side in ("ours", "peer"):
        for figure in ("events_per_s", "p50_ms", "p99_ms"):
            _positive(results, f"delivery.{side}.{figure}")
    for side in ("ours", "peer", "floor"):
        _positive(results, f"idle.{side}.bytes_per_socket")
    for side in ("ours", "floor"):
        for figure in ("p50_ms", "p99_ms", "msgs_per_s"):
            _positive(results, f"chat.{side}.{figure}")
            _positive(results, f"chat.{side}.stream.{figure}")
    _positive(results, "chat.ours.stream.ttfc_p50_ms")
    _positive(results, "storm.ours.seconds")
    assert results["storm"]["ours"]["errors"] == 0
    assert results["chat"]["ours"]["errors"] == 0

    assert results["delivery"]["ours"]["lost_at_saturation"] == 0
    assert results["delivery"]["peer"]["lost_at_saturation"] == 0
    machine = results["machine"]
    assert machine["cores"] >= 1
    assert machine["memory_bytes"] > 0
    assert machine["python"]
    assert "python-socketio" in machine["packages"]
    for moment in ("calibration_at_start", "calibration_at_end"):
        _positive(machine, f"{moment}.python_loop_ms")
        for idle in ("back_to_back", "after_2ms_idle"):
            _positive(machine, f"{moment}.xadd_cpu_us.{idle}")
            _positive(machine, f"{moment}.xadd_wall_us.{idle}")
    assert "delivery_events_ratio" in results["bar"]
    assert "| ratio" in done.stdout  # the table was printed

    assert results["processes"], "the run recorded no process"
    left = [pid for pid in results["processes"] if running(pid)]
    assert not left, f"still running after the benchmark: {left}"
