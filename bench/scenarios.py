"""The four scenarios, each run for us and for the peer or floor in one invocation.

Every process is started here and registered on the run's `ExitStack`, so an error, Ctrl-C
or SIGTERM stops all of them (helpers are process groups of their own; our api, worker and
executor are `LocalStack` children; Redis is the embedded engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import chat_hops
from bench.common import (
    REPO,
    SECRET,
    Counters,
    Helper,
    ask_all,
    cpu_seconds,
    percentile,
    rss_bytes,
    unpack_floats,
)
from services.cli.embedded import RedisServer, free_port
from services.cli.stack import Child, LocalStack
from services.core.auth import issue_token
from services.core.settings import load_settings
from services.core.tiers import MAX_PER_MINUTE

TENANTS = 8
CONNECT_CONCURRENCY = 16  # per client process, when not storming
CONNECT_RETRIES = 5  # 1013 "try again later" refusals retried, when not storming
UNLIMITED = {
    "enterprise": {
        "requestsPerMinutePerTenant": MAX_PER_MINUTE,  # a million a second: no limit here
        "requestsPerMinutePerSession": MAX_PER_MINUTE,
        "maxConnections": 1_000_000,
    }
}


@dataclass(frozen=True)
class Plan:
    name: str
    delivery_sockets: int
    delivery_procs: int
    warmup_seconds: float
    saturate_seconds: float
    latency_seconds: float
    window: int
    rounds: int
    direct: bool
    idle_sockets: int
    idle_warm: int
    idle_procs: int
    settle_seconds: float
    chat_sessions: int
    chat_procs: int
    chat_seconds: float
    storm_sockets: int
    storm_procs: int
    storm_timeout: float
    storm_peer: bool


QUICK = Plan(
    name="quick",
    delivery_sockets=1000,
    delivery_procs=4,
    warmup_seconds=0.7,
    saturate_seconds=3.0,
    latency_seconds=2.5,
    window=2000,
    rounds=1,
    direct=False,
    idle_sockets=5000,
    idle_warm=100,
    idle_procs=4,
    settle_seconds=1.5,
    chat_sessions=64,
    chat_procs=2,
    chat_seconds=2.0,
    storm_sockets=2000,
    storm_procs=4,
    storm_timeout=15.0,
    storm_peer=False,
)
PLANS = {
    "quick": QUICK,
    "full": replace(
        QUICK,
        name="full",
        warmup_seconds=2.0,
        saturate_seconds=10.0,
        latency_seconds=8.0,
        rounds=2,
        direct=True,
        settle_seconds=8.0,
        chat_seconds=8.0,
        storm_timeout=60.0,
        storm_peer=True,
    ),
    "smoke": replace(
        QUICK,
        name="smoke",
        delivery_sockets=20,
        delivery_procs=2,
        warmup_seconds=0.3,
        saturate_seconds=1.0,
        latency_seconds=1.0,
        window=50,
        idle_sockets=40,
        idle_warm=4,
        idle_procs=2,
        settle_seconds=0.5,
        chat_sessions=8,
        chat_seconds=1.0,
        storm_sockets=20,
        storm_procs=2,
        storm_timeout=20.0,
        storm_peer=True,
    ),
}


def our_ws_implementation() -> str:
    """The uvicorn websocket implementation our api runs on, so the peer runs on the same."""
    source = (REPO / "services" / "cli" / "serve_api.py").read_text()
    found = re.search(r"""\bws\s*=\s*["']([a-z-]+)["']""", source)
    if found:
        return found.group(1)
    # A protocol class (ws=SomeProtocol): the uvicorn implementation it says it extends.
    named = re.search(r"\bws\s*=\s*([A-Za-z_]\w*)", source)
    if named:
        module = importlib.import_module("services.cli.serve_api")
        return str(getattr(module, named.group(1)).uvicorn_implementation)
    return "websockets"


def tokens() -> dict[str, str]:
    settings = load_settings(jwt_secret=SECRET)
    return {
        f"bench-{i}": issue_token(
            settings, tenant_id=f"bench-{i}", user_id="bench", ttl_seconds=7200
        )
        for i in range(TENANTS)
    }


def wait_port(port: int, helper: Helper, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not helper.alive():
            raise RuntimeError(f"{helper.name} exited:\n{helper.tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{helper.name} not listening on {port}:\n{helper.tail()}")


def settle(seconds: float) -> None:
    time.sleep(seconds)


class Run:
    """One benchmark invocation: the plan, the shared Redis, and everything started."""

    def __init__(self, plan: Plan, log_dir: Path, stack: contextlib.ExitStack, say: Callable):
        self.plan = plan
        self.log_dir = log_dir
        self.exits = stack
        self.say = say
        self.tokens = tokens()
        self.redis = RedisServer().start()
        stack.callback(self.redis.cleanup)
        assert self.redis.process is not None
        self.pids: list[int] = [self.redis.process.pid]  # everything started, for the record
        self.profile_dir: Path | None = None

    # processes ---------------------------------------------------------------------------------

    def helper(self, name: str, module: str, config: dict[str, Any]) -> Helper:
        helper = Helper(name, module, config, self.log_dir)
        self.exits.callback(helper.stop)
        self.pids.append(helper.pid)
        return helper

    def ours(self, apis: int, *, worker: bool, executor: bool) -> tuple[LocalStack, list[Child]]:
        stack = LocalStack.for_redis(
            self.redis.url,
            log_dir=self.log_dir,
            jwt_secret=SECRET,
            default_tier="enterprise",
            tiers=json.dumps(UNLIMITED),
            max_websocket_connections="100000",
            executor_chunk_delay_ms="0",
            executor_concurrency="512",
            log_level="WARNING",
        )
        stack.own_sessions = True  # as every peer, floor and client process (see LocalStack)
        self.exits.callback(stack.stop)
        children = [stack.start_api() for _ in range(apis)]
        if worker:
            stack.start("worker")
        if executor:
            stack.start("executor")
        self.pids += [child.process.pid for child in stack.children]
        stack.wait_ready(*children, timeout=60)
        return stack, children

    def peer(self, count: int, kind: str = "socketio") -> list[tuple[Helper, int]]:
        servers = []
        for i in range(count):
            port = free_port()
            helper = self.helper(
                f"{kind}-{i}-{port}",
                "bench.peer_server",
                {
                    "kind": kind,
                    "port": port,
                    "redis_url": self.redis.url,
                    "ws": our_ws_implementation(),
                },
            )
            servers.append((helper, port))
        for helper, port in servers:
            wait_port(port, helper)
        return servers

    def fleet(
        self, mode: str, name: str, targets: list[int], sockets: int, procs: int, first: int = 0
    ) -> tuple[list[Helper], Counters]:
        counters = Counters.create(procs)
        self.exits.callback(counters.close, remove=True)
        helpers = []
        per = -(-sockets // procs)
        for p in range(procs):
            start = first + p * per
            count = max(0, min(per, first + sockets - start))
            helpers.append(
                self.helper(
                    f"{name}-{p}",
                    "bench.clients",
                    {
                        "mode": mode,
                        "targets": [["127.0.0.1", port] for port in targets],
                        "first": start,
                        "count": count,
                        "tenants": TENANTS,
                        "tokens": self.tokens,
                        "counters": str(counters.path),
                        "slots": procs,
                        "slot": p,
                    },
                )
            )
        return helpers, counters

    def connect(
        self,
        helpers: list[Helper],
        *,
        concurrency: int = CONNECT_CONCURRENCY,
        retries: int = CONNECT_RETRIES,
        timeout: float = 90,
    ) -> dict[str, Any]:
        start_at = time.monotonic() + 0.5
        command = {
            "cmd": "connect",
            "start_at": start_at,
            "concurrency": concurrency,
            "retries": retries,
            "timeout": timeout,
        }
        answers = ask_all(helpers, command, timeout + 30)
        return _connected(answers, start_at)

    def connect_groups(self, groups: dict[str, list[Helper]]) -> dict[str, dict[str, Any]]:
        """`connect` for several fleets at once (all commands sent before any answer is read)."""
        start_at = time.monotonic() + 0.5
        command = {
            "cmd": "connect",
            "start_at": start_at,
            "concurrency": CONNECT_CONCURRENCY,
            "retries": CONNECT_RETRIES,
            "timeout": 120,
        }
        for helpers in groups.values():
            for helper in helpers:
                helper.send(command)
        return {
            side: _connected([h.recv(150) for h in helpers], start_at)
            for side, helpers in groups.items()
        }

    def close(self, helpers: list[Helper]) -> None:
        with contextlib.suppress(Exception):
            ask_all(helpers, {"cmd": "close"}, 30)
        for helper in helpers:
            helper.stop()

    def flush_redis(self) -> None:
        from redis import Redis

        client = Redis.from_url(self.redis.url)
        try:
            client.flushall()
        finally:
            client.close()

    def profile(self, label: str, pids: dict[str, int], seconds: float) -> list[subprocess.Popen]:
        """py-spy on each pid for `seconds` (when --profile DIR is given)."""
        if self.profile_dir is None:
            return []
        spy = shutil.which("py-spy") or str(Path(REPO, ".venv", "bin", "py-spy"))
        started = []
        for role, pid in pids.items():
            if role == "redis":
                continue
            out = self.profile_dir / f"{label}-{role}"
            process = subprocess.Popen(  # noqa: S603 (py-spy on our own children)
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    str(int(seconds)),
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "-o",
                    str(out) + ".txt",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.exits.callback(_end, process)
            started.append(process)
        return started


def _connected(answers: list[dict[str, Any]], start_at: float) -> dict[str, Any]:
    return {
        "ok": sum(a["ok"] for a in answers),
        "errors": sum(a["errors"] for a in answers),
        "first_error": next((a["first_error"] for a in answers if a["first_error"]), ""),
        "seconds": max(a["last_ready"] for a in answers) - start_at,
        "retried": sum(a.get("retried", 0) for a in answers),
    }


class CommandMeter:
    """Redis commands executed over a window (INFO commandstats), to report them per event."""

    def __init__(self, url: str) -> None:
        from redis import Redis

        self.client = Redis.from_url(url)
        self.before = self._read()
        self.after: dict[str, int] | None = None

    def _read(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def stop(self) -> None:
        """Close the window (before anything else runs on the server)."""
        self.after = self._read()
        self.client.close()

    def per(self, events: float) -> dict[str, float]:
        if self.after is None:
            self.stop()
        after = self.after or {}
        if events <= 0:
            return {}
        counts = {
            name: round((calls - self.before.get(name, 0)) / events, 2)
            for name, calls in after.items()
        }
        return {name: n for name, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= 0.01}


class CpuMeter:
    """CPU used by each process over a window, in cores (CPU seconds per wall second)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.began = time.monotonic()
        self.before = {role: _cpu(pid) for role, pid in self.pids.items()}

    def seconds(self) -> dict[str, float]:
        return {role: _cpu(pid) - self.before[role] for role, pid in self.pids.items()}

    def cores(self) -> dict[str, float]:
        wall = time.monotonic() - self.began
        return {role: round(used / wall, 3) for role, used in self.seconds().items()}


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError):
        return 0.0


def _fold_clients(cores: dict[str, float]) -> dict[str, float]:
    """Client processes summed into one `clients` figure."""
    folded = {role: value for role, value in cores.items() if not role.startswith("clients-")}
    folded["clients"] = round(
        sum(value for role, value in cores.items() if role.startswith("clients-")), 3
    )
    return folded


def _per_event(used: dict[str, float], events: float, roles: list[str]) -> dict[str, float]:
    """Microseconds of CPU per event (or message) for each role, and their sum as `servers`."""
    if events <= 0:
        return {}
    figures = {role: round(used[role] / events * 1e6, 1) for role in used}
    figures["servers"] = round(sum(figures[role] for role in roles if role in figures), 1)
    return figures


def _end(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
    if process.poll() is None:
        process.kill()
        process.wait()


def _latency(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples, 0.50), 3),
        "p90_ms": round(percentile(samples, 0.90), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "max_ms": round(max(samples), 3) if samples else 0.0,
        "samples": len(samples),
    }


def _delivery_latency(reports: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for r in reports for s in unpack_floats(r["samples"])]
    figures: dict[str, Any] = _latency(samples)
    to_log = [s for r in reports for s in unpack_floats(r["to_log"])]
    if to_log:  # ours: where the time goes, split at the session-log append
        from_log = [s for r in reports for s in unpack_floats(r["from_log"])]
        figures["emitter_to_log_ms"] = _split(to_log)
        figures["log_to_client_ms"] = _split(from_log)
    return figures


def _split(samples: list[float]) -> dict[str, float]:
    """Percentiles of a latency part measured against the log id (1 ms resolution)."""
    return {
        "p50": round(percentile(samples, 0.5), 1),
        "p90": round(percentile(samples, 0.9), 1),
        "p99": round(percentile(samples, 0.99), 1),
    }


# ---- 1. delivery ----------------------------------------------------------------------------


def delivery_side(
    run: Run,
    side: str,
    kind: str,
    targets: list[int],
    cpu_pids: dict[str, int],
    fixed_rates: list[float],
) -> dict[str, Any]:
    plan = run.plan
    mode = "socketio" if kind == "peer" else "ours"
    fleet, counters = run.fleet(
        mode, f"delivery-{side}", targets, plan.delivery_sockets, plan.delivery_procs
    )
    try:
        connected = run.connect(fleet)
        if connected["ok"] != plan.delivery_sockets:
            raise RuntimeError(f"{side}: only {connected['ok']} sockets connected: {connected}")
        emitter = run.helper(
            f"emitter-{side}",
            "bench.emitter",
            {
                "kind": kind,
                "redis_url": run.redis.url,
                "sockets": plan.delivery_sockets,
                "tenants": TENANTS,
                "counters": str(counters.path),
                "slots": plan.delivery_procs,
            },
        )
        emitter.recv(30)
        warm = emitter.ask({"cmd": "rate", "rate": 500, "seconds": 0.5}, 60)
        if warm["lost"]:
            raise RuntimeError(f"{side}: warm-up events lost: {warm}")
        spies = run.profile(
            f"delivery-{side}", cpu_pids, plan.warmup_seconds + plan.saturate_seconds
        )
        assert run.redis.process is not None
        clients = {f"clients-{i}": helper.pid for i, helper in enumerate(fleet)}
        meter = CpuMeter(
            {**cpu_pids, "emitter": emitter.pid, "redis": run.redis.process.pid, **clients}
        )
        commands = CommandMeter(run.redis.url)
        ask_all(fleet, {"cmd": "record"}, 30)
        saturated = emitter.ask(
            {
                "cmd": "saturate",
                "seconds": plan.saturate_seconds,
                "warmup": plan.warmup_seconds,
                "window": plan.window,
            },
            plan.saturate_seconds + plan.warmup_seconds + 60,
        )
        cpu = _fold_clients(meter.cores())
        used = _fold_clients(meter.seconds())
        at_saturation = _delivery_latency(ask_all(fleet, {"cmd": "report"}, 30))
        for spy in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
        result: dict[str, Any] = {
            "events_per_s": round(saturated["events_per_s"], 1),
            "lost_at_saturation": saturated["lost"],
            "cpu_cores_at_saturation": cpu,
            "cpu_us_per_event": _per_event(used, saturated["delivered"], [*cpu_pids, "redis"]),
            "redis_commands_per_event": commands.per(saturated["delivered"]),
            "latency_at_saturation": at_saturation,
            "sockets": connected["ok"],
            "connect_retries_1013": connected["retried"],
        }
        rates = [saturated["events_per_s"] / 2, *fixed_rates]
        for index, rate in enumerate(rates):
            ask_all(fleet, {"cmd": "record"}, 30)
            paced_meter = CpuMeter(
                {**cpu_pids, "emitter": emitter.pid, "redis": run.redis.process.pid, **clients}
            )
            half_spies = (
                run.profile(f"delivery-{side}-half", cpu_pids, plan.latency_seconds)
                if index == 0
                else []
            )
            paced_commands = CommandMeter(run.redis.url)
            paced = emitter.ask(
                {"cmd": "rate", "rate": rate, "seconds": plan.latency_seconds},
                plan.latency_seconds + 60,
            )
            paced_commands.stop()
            for spy in half_spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
            reports = ask_all(fleet, {"cmd": "report"}, 30)
            figures = {
                "rate": round(rate, 1),
                "achieved_rate": round(paced["achieved_rate"], 1),
                "lost": paced["lost"],
                "cpu_cores": _fold_clients(paced_meter.cores()),
                "redis_commands_per_event": paced_commands.per(paced["emitted"]),
                **_delivery_latency(reports),
            }
            if index == 0:
                result.update(
                    p50_ms=figures["p50_ms"],
                    p99_ms=figures["p99_ms"],
                    latency_at_half_rate=figures,
                )
            else:
                result.setdefault("latency_at_fixed_rates", []).append(figures)
        return result
    finally:
        run.close(fleet)


def delivery(run: Run) -> dict[str, Any]:
    plan = run.plan
    run.say(f"delivery: {plan.delivery_sockets} sockets over 2 api processes")
    stack, apis = run.ours(2, worker=True, executor=False)
    worker = next(c for c in stack.children if c.role == "worker")
    peers = run.peer(2)
    ours_pids = {
        "api-0": apis[0].process.pid,
        "api-1": apis[1].process.pid,
        "worker": worker.process.pid,
    }
    peer_pids = {f"server-{i}": helper.pid for i, (helper, _) in enumerate(peers)}
    ports_ours = [api.port for api in apis if api.port is not None]
    ports_peer = [port for _, port in peers]
    rounds: dict[str, list[dict[str, Any]]] = {"peer": [], "ours": []}
    if plan.direct:
        rounds["ours_direct"] = []
    for r in range(plan.rounds):
        peer = delivery_side(run, "peer", "peer", ports_peer, peer_pids, [])
        rounds["peer"].append(peer)
        run.say(f"  round {r + 1} peer: {_brief(peer)}")
        same = [peer["events_per_s"] / 2]
        ours = delivery_side(run, "ours", "ours", ports_ours, ours_pids, same)
        rounds["ours"].append(ours)
        run.say(f"  round {r + 1} ours: {_brief(ours)}")
        if plan.direct:
            direct = delivery_side(run, "ours_direct", "ours_direct", ports_ours, ours_pids, same)
            rounds["ours_direct"].append(direct)
            run.say(f"  round {r + 1} ours_direct: {_brief(direct)}")
        run.flush_redis()
    for helper, _ in peers:
        helper.stop()
    stack.stop()
    result: dict[str, Any] = {}
    for side, runs in rounds.items():
        best = max(runs, key=lambda x: x["events_per_s"])
        result[side] = {**best, "rounds": [_brief_dict(x) for x in runs]}
    return result


def _brief(figures: dict[str, Any]) -> str:
    return (
        f"{figures['events_per_s']:.0f} events/s, p50 {figures['p50_ms']:.1f} ms, "
        f"p99 {figures['p99_ms']:.1f} ms at {figures['latency_at_half_rate']['rate']:.0f}/s"
    )


def _brief_dict(figures: dict[str, Any]) -> dict[str, Any]:
    return {key: figures[key] for key in ("events_per_s", "p50_ms", "p99_ms")}


# ---- 2. idle and 4. storm -------------------------------------------------------------------


def refusals(child: Child) -> dict[str, float]:
    """Our api's socket refusals so far, by reason (from its Prometheus endpoint)."""
    counts: dict[str, float] = {}
    with contextlib.suppress(OSError):
        url = f"http://127.0.0.1:{child.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
        for line in text.splitlines():
            if line.startswith("orchestrator_websocket_refusals_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                counts[reason] = float(line.rsplit(" ", 1)[1])
    return counts


def idle(run: Run, servers: dict[str, tuple[str, int, int]]) -> dict[str, Any]:
    """RSS delta per socket on each server; the three fleets connect at the same time.

    Each server is its own process, so connecting them together changes how long it takes,
    not what each one holds. `servers`: side -> (client mode, port, pid).
    """
    plan = run.plan
    run.say(f"idle: {plan.idle_sockets} sockets on one process each: " + ", ".join(servers))
    warm = {
        side: run.fleet(mode, f"idle-{side}-warm", [port], plan.idle_warm, 1, first=900_000)[0]
        for side, (mode, port, _) in servers.items()
    }
    fleets = {
        side: run.fleet(mode, f"idle-{side}", [port], plan.idle_sockets, plan.idle_procs)[0]
        for side, (mode, port, _) in servers.items()
    }
    try:
        warmed = run.connect_groups(warm)
        for side, figures in warmed.items():
            if figures["ok"] != plan.idle_warm:
                raise RuntimeError(f"idle {side}: warm-up sockets failed: {figures}")
        settle(plan.settle_seconds / 2)
        before = {side: rss_bytes(pid) for side, (_, _, pid) in servers.items()}
        connected = run.connect_groups(fleets)
        settle(plan.settle_seconds)
        after = {side: rss_bytes(pid) for side, (_, _, pid) in servers.items()}
        result: dict[str, Any] = {}
        for side, figures in connected.items():
            opened = figures["ok"]
            if opened == 0:
                raise RuntimeError(f"idle {side}: no socket opened: {figures}")
            result[side] = {
                "bytes_per_socket": round((after[side] - before[side]) / opened),
                "sockets": opened,
                "errors": figures["errors"],
                "first_error": figures["first_error"],
                "rss_before": before[side],
                "rss_after": after[side],
                "connect_seconds": round(figures["seconds"], 3),
                "connect_retries_1013": figures["retried"],
            }
            run.say(f"  {side}: {result[side]['bytes_per_socket']:,} bytes/socket")
        return result
    finally:
        for helpers in [*fleets.values(), *warm.values()]:
            run.close(helpers)


def storm(run: Run, side: str, mode: str, port: int, api: Child | None) -> dict[str, Any]:
    """`storm_sockets` sockets asked for at the same instant; seconds until all are ready."""
    plan = run.plan
    run.say(f"storm: {plan.storm_sockets} sockets at once ({side})")
    fleet, _ = run.fleet(
        mode, f"storm-{side}", [port], plan.storm_sockets, plan.storm_procs, first=500_000
    )
    try:
        time.sleep(0.5)  # every client process up before the clock starts
        before = refusals(api) if api is not None else {}
        stormed = run.connect(fleet, concurrency=0, retries=0, timeout=plan.storm_timeout)
        result: dict[str, Any] = {
            "seconds": round(stormed["seconds"], 3),
            "errors": stormed["errors"],
            "first_error": stormed["first_error"],
            "sockets": stormed["ok"],
        }
        if api is not None:
            after = refusals(api)
            result["refusals_by_reason"] = {
                reason: after[reason] - before.get(reason, 0.0) for reason in after
            }
        run.say(f"  {side}: {result}")
        return result
    finally:
        run.close(fleet)


def idle_and_storm(run: Run, do_idle: bool, do_storm: bool) -> dict[str, dict[str, Any]]:
    stack, (api,) = run.ours(1, worker=False, executor=False)
    ((server, port),) = run.peer(1)
    assert api.port is not None
    result: dict[str, dict[str, Any]] = {"idle": {}, "storm": {}}
    if do_idle:
        ((echo, echo_port),) = run.peer(1, kind="echo")
        result["idle"] = idle(
            run,
            {
                "ours": ("ours", api.port, api.process.pid),
                "peer": ("socketio", port, server.pid),
                "floor": ("echo", echo_port, echo.pid),
            },
        )
        echo.stop()
        time.sleep(1.0)
    if do_storm:
        result["storm"]["ours"] = storm(run, "ours", "ours", api.port, api)
        if run.plan.storm_peer:
            result["storm"]["peer"] = storm(run, "peer", "socketio", port, None)
    server.stop()
    stack.stop()
    run.flush_redis()
    return result


# ---- 3. chat --------------------------------------------------------------------------------


def chat_ours(run: Run) -> dict[str, Any]:
    plan = run.plan
    run.say(f"chat: ours, {plan.chat_sessions} sessions over 2 api processes")
    stack, apis = run.ours(2, worker=True, executor=True)
    ports = [api.port for api in apis if api.port is not None]
    pids = {
        c.role + (f"-{i}" if c.role == "api" else ""): c.process.pid
        for i, c in enumerate(stack.children)
    }
    assert run.redis.process is not None
    pids["redis"] = run.redis.process.pid
    counters = Counters.create(plan.chat_procs)
    run.exits.callback(counters.close, remove=True)
    per = -(-plan.chat_sessions // plan.chat_procs)
    fleet = [
        run.helper(
            f"chat-ours-{p}",
            "bench.clients",
            {
                "mode": "chat",
                "targets": [["127.0.0.1", port] for port in ports],
                "first": p * per,
                "count": min(per, plan.chat_sessions - p * per),
                "tenants": TENANTS,
                "tokens": run.tokens,
                "counters": str(counters.path),
                "slots": plan.chat_procs,
                "slot": p,
            },
        )
        for p in range(plan.chat_procs)
    ]
    try:
        connected = ask_all(fleet, {"cmd": "connect"}, 90)
        if any(a["errors"] for a in connected):
            raise RuntimeError(f"chat: sessions failed to connect: {connected}")
        result: dict[str, Any] = {}
        for stream in (False, True):
            # warm-up: a short paced run
            ask_all(
                fleet,
                {
                    "cmd": "rate",
                    "rate": 20,
                    "seconds": 0.5,
                    "stream": stream,
                    "start_at": time.monotonic() + 0.2,
                },
                60,
            )
            label = "stream" if stream else "plain"
            spies = run.profile(f"chat-{label}", pids, plan.warmup_seconds + plan.chat_seconds)
            start_at = time.monotonic() + 0.3
            for helper in fleet:
                helper.send(
                    {
                        "cmd": "saturate",
                        "seconds": plan.warmup_seconds + plan.chat_seconds,
                        "stream": stream,
                        "start_at": start_at,
                    }
                )
            _sleep_until(start_at + plan.warmup_seconds)
            meter = CpuMeter({**pids, **{f"clients-{i}": h.pid for i, h in enumerate(fleet)}})
            commands = CommandMeter(run.redis.url)
            mark = (time.monotonic(), counters.total())
            _sleep_until(start_at + plan.warmup_seconds + plan.chat_seconds)
            end = (time.monotonic(), counters.total())
            commands.stop()
            cpu = _fold_clients(meter.cores())
            used = _fold_clients(meter.seconds())
            saturated = [h.recv(90) for h in fleet]
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
            rate = (end[1] - mark[1]) / (end[0] - mark[0])
            half = rate / 2
            meter = CpuMeter({**pids, **{f"clients-{i}": h.pid for i, h in enumerate(fleet)}})
            spies = run.profile(f"chat-{label}-half", pids, plan.chat_seconds + 0.3)
            paced = ask_all(
                fleet,
                {
                    "cmd": "rate",
                    "rate": half / plan.chat_procs,
                    "seconds": plan.chat_seconds,
                    "stream": stream,
                    "start_at": time.monotonic() + 0.3,
                },
                plan.chat_seconds + 90,
            )
            figures = _chat_figures(rate, paced, sum(a["errors"] for a in saturated))
            figures["cpu_cores_at_half_load"] = _fold_clients(meter.cores())
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
            figures["hops_ms"] = _hops(run.redis.url, paced)
            figures["cpu_cores_at_saturation"] = cpu
            figures["cpu_us_per_message"] = _per_event(used, end[1] - mark[1], list(pids))
            figures["redis_commands_per_message"] = commands.per(end[1] - mark[1])
            figures["first_error"] = next(
                (a["first_error"] for a in [*saturated, *paced] if a["first_error"]), ""
            )
            result[label] = figures
            run.say(f"  ours {label}: {_chat_brief(figures)}")
            run.say(
                "    mean per hop at 50% load (ms): "
                + ", ".join(f"{hop} {v['mean']:.2f}" for hop, v in figures["hops_ms"].items())
            )
            run.say(f"    CPU cores at 50% load: {figures['cpu_cores_at_half_load']}")
        return result
    finally:
        run.close(fleet)
        stack.stop()
        run.flush_redis()


def _hops(redis_url: str, paced: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each hop's share of the latency at 50% load, from the ids Redis gave the action, the
    completion callback and the answer in the session log (see bench/chat_hops.py)."""
    times = {
        task_id: {"sent": due, "received": received, "logged": chat_hops.id_ms(log_id)}
        for answer in paced
        for task_id, (due, received, log_id) in answer["hops"].items()
    }
    asyncio.run(chat_hops.stream_times(redis_url, times))
    return chat_hops.split(times)


def chat_floor(run: Run, same_load: dict[str, float]) -> dict[str, Any]:
    plan = run.plan
    run.say("chat: floor (the same Redis hops in one asyncio process)")
    floor = run.helper(
        "chat-floor",
        "bench.floor_chat",
        {"redis_url": run.redis.url, "sessions": plan.chat_sessions},
    )
    floor.recv(30)
    result: dict[str, Any] = {}
    try:
        for stream in (False, True):
            label = "stream" if stream else "plain"
            floor.ask({"cmd": "rate", "rate": 20, "seconds": 0.5, "stream": stream}, 60)
            assert run.redis.process is not None
            meter = CpuMeter({"floor": floor.pid, "redis": run.redis.process.pid})
            commands = CommandMeter(run.redis.url)
            saturated = floor.ask(
                {
                    "cmd": "saturate",
                    "seconds": plan.chat_seconds,
                    "warmup": plan.warmup_seconds,
                    "stream": stream,
                },
                plan.chat_seconds + 60,
            )
            rate = saturated["msgs_per_s"]
            cpu, used = meter.cores(), meter.seconds()
            commands.stop()
            paced = floor.ask(
                {"cmd": "rate", "rate": rate / 2, "seconds": plan.chat_seconds, "stream": stream},
                plan.chat_seconds + 60,
            )
            figures = _chat_figures(rate, [paced], saturated["errors"])
            figures["cpu_cores_at_saturation"] = cpu
            figures["cpu_us_per_message"] = _per_event(
                used, saturated["completed"], ["floor", "redis"]
            )
            figures["redis_commands_per_message"] = commands.per(saturated["completed"])
            if label in same_load:
                again = floor.ask(
                    {
                        "cmd": "rate",
                        "rate": same_load[label],
                        "seconds": plan.chat_seconds,
                        "stream": stream,
                    },
                    plan.chat_seconds + 60,
                )
                figures["at_ours_load"] = _chat_figures(0, [again], 0)
                del figures["at_ours_load"]["msgs_per_s"]
            result[label] = figures
            run.say(f"  floor {label}: {_chat_brief(figures)}")
        return result
    finally:
        floor.stop()
        run.flush_redis()


def _chat_figures(
    rate: float, paced: list[dict[str, Any]], saturation_errors: int
) -> dict[str, Any]:
    samples = [s for a in paced for s in unpack_floats(a["samples"])]
    ttfc = [s for a in paced for s in unpack_floats(a["ttfc"])]
    figures: dict[str, Any] = {
        "msgs_per_s": round(rate, 1),
        "load_rate": round(sum(a["sent"] for a in paced) / max(1e-9, _seconds(paced)), 1),
        **_latency(samples),
        "errors": sum(a["errors"] for a in paced),
        "saturation_errors": saturation_errors,
        "sent": sum(a["sent"] for a in paced),
        "answered": sum(a["answered"] for a in paced),
    }
    if ttfc:
        figures["ttfc_p50_ms"] = round(percentile(ttfc, 0.5), 3)
        figures["ttfc_p99_ms"] = round(percentile(ttfc, 0.99), 3)
    return figures


def _seconds(paced: list[dict[str, Any]]) -> float:
    return max((a.get("elapsed", 0.0) for a in paced), default=0.0) or 1.0


def _chat_brief(figures: dict[str, Any]) -> str:
    text = (
        f"{figures['msgs_per_s']:.0f} msgs/s; at {figures['load_rate']:.0f}/s p50 "
        f"{figures['p50_ms']:.1f} ms p99 {figures['p99_ms']:.1f} ms, errors {figures['errors']}"
    )
    if "ttfc_p50_ms" in figures:
        text += f", first chunk p50 {figures['ttfc_p50_ms']:.1f} ms"
    return text


def _sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        time.sleep(delay)
