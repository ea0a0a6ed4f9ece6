"""Child processes that die with the process that started them, even when it is SIGKILLed.

`orchestrator dev`, the tests and the benchmarks start Valkey, PostgreSQL and the api, worker
and executor in sessions of their own (a Ctrl-C must not stop Redis before the apis drain), so
nothing stops them when their parent dies without its cleanup (SIGKILL, the OOM killer, a
cancelled CI job): they would hold their ports and memory forever. On Linux each child asks
the kernel, between fork and exec, for a signal when its parent dies (`PR_SET_PDEATHSIG`);
the parent's orderly shutdown on Ctrl-C or SIGTERM is unchanged.

The kernel sends that signal when the *thread* that forked the child ends, not the process:
a server started from `asyncio.to_thread` would be stopped as soon as that pool thread
exits. So a child wanted from any thread but the main one is forked by one daemon thread
that lives as long as the process.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHANED_EXIT_CODE = 125


def _load_prctl() -> Callable[..., int] | None:
    """libc's `prctl`, or None where the parent-death signal does not exist.

    Only Linux has `PR_SET_PDEATHSIG` (macOS and the BSDs have no equivalent a child can set
    before exec): there the helpers start children as before, and a killed parent leaves them
    running as it always did.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _load_prctl()


def _arm(parent: int, death_signal: signal.Signals) -> Callable[[], None]:
    """The `preexec_fn` that runs in the child after fork, after `user`/`group` are applied
    (a credential change would clear the parent-death signal), just before exec."""
    assert _PRCTL is not None

    def arm() -> None:
        if _PRCTL(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the request: no signal will come
            os._exit(ORPHANED_EXIT_CODE)

    return arm


def popen(
    args: Sequence[str], *, death_signal: signal.Signals = signal.SIGTERM, **options: Any
) -> subprocess.Popen[Any]:
    """`subprocess.Popen(args, **options)` for a child that gets `death_signal` when this
    process dies, whichever thread calls it."""
    if _PRCTL is None:
        return subprocess.Popen(args, **options)
    preexec = _arm(os.getpid(), death_signal)

    def start() -> subprocess.Popen[Any]:
        return subprocess.Popen(args, preexec_fn=preexec, **options)

    if threading.current_thread() is threading.main_thread():
        return start()
    return _on_spawner(start)


def run(args: Sequence[str], *, timeout: float, **options: Any) -> subprocess.CompletedProcess[Any]:
    """`subprocess.run(args, capture_output=True, timeout=timeout, check=False, **options)`
    for a short-lived tool (initdb, cluster create) that dies with this process too."""
    with popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_spawner_lock = threading.Lock()
_spawner: threading.Thread | None = None


def _on_spawner(start: Callable[[], T]) -> T:
    """Run `start` on the process-long spawner thread, so that the children it forks are
    not signalled when the calling (pool) thread ends."""
    future: Future[T] = Future()

    def job() -> None:
        try:
            future.set_result(start())
        except BaseException as exc:  # handed back to the caller, whatever it is
            future.set_exception(exc)

    _ensure_spawner()
    _jobs.put(job)
    return future.result()


def _ensure_spawner() -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve_jobs, name="child-spawner", daemon=True)
            _spawner.start()


def _serve_jobs() -> None:
    """Daemon: it ends only with the process, which is when its children should go too."""
    while True:
        _jobs.get()()
