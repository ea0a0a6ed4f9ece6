"""Where an idle socket's memory goes in our api: tracemalloc, before and after N sockets.

    python -m bench.memory_profile [--sockets 2000] [--top 25] [--frames 12]

Starts an embedded Redis and one api process under tracemalloc (this module re-executes
itself as the api with `--serve`: tracing on, a snapshot written on SIGUSR1), opens a few
warm-up sockets, snapshots, opens `--sockets` more, snapshots again, and prints the growth
grouped by the line that allocated it and by our own frame that led there. tracemalloc sees
the Python allocator only (not the kernel's socket buffers, nor libuv's own mallocs), so the
RSS delta is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, SECRET, raise_open_files, rss_bytes
from bench.wsclient import WsClient


def serve(port: int, snapshot_dir: Path, frames: int, ws: str) -> None:
    """The api, traced; SIGUSR1 writes `snapshot-<n>` into `snapshot_dir`."""
    if frames:
        tracemalloc.start(frames)
    taken = [0]

    def dump(*_: object) -> None:
        taken[0] += 1
        if frames:
            tracemalloc.take_snapshot().dump(str(snapshot_dir / f"snapshot-{taken[0]}"))
        (snapshot_dir / f"done-{taken[0]}").touch()

    if ws:  # a what-if for the lead: the same api on another uvicorn websocket implementation
        import uvicorn

        original = uvicorn.Config.__init__

        def patched(self: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
            kwargs["ws"] = ws
            original(self, *args, **kwargs)

        uvicorn.Config.__init__ = patched  # type: ignore[method-assign]

    signal.signal(signal.SIGUSR1, dump)
    from services.cli.main import main

    sys.argv = ["orchestrator", "api", "--host", "127.0.0.1", "--port", str(port)]
    main()


async def open_sockets(port: int, tokens: dict[str, str], first: int, count: int) -> list:
    gate = asyncio.Semaphore(32)
    acked: list[WsClient] = []

    async def one(i: int) -> None:
        tenant = f"bench-{i % len(tokens)}"
        ready = asyncio.get_running_loop().create_future()

        def on_text(ws: WsClient, data: bytes) -> None:
            if not ready.done():
                ready.set_result(None)

        async with gate:
            ws = await WsClient.connect(
                "127.0.0.1",
                port,
                f"/ws/{tenant}/m{i}",
                on_text,
                ["orchestrator.v1", "bearer." + tokens[tenant]],
            )
            await asyncio.wait_for(ready, 30)
            acked.append(ws)

    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return acked


def snapshot(process: subprocess.Popen, directory: Path, n: int) -> tracemalloc.Snapshot | None:
    process.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not (directory / f"done-{n}").exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError("the traced api wrote no snapshot")
        time.sleep(0.1)
    path = directory / f"snapshot-{n}"
    return tracemalloc.Snapshot.load(str(path)) if path.exists() else None


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, sockets: int, top: int):
    print(f"\n-- growth per socket by allocating line (top {top})")
    stats = after.compare_to(before, "lineno")
    total = sum(s.size_diff for s in stats)
    print(f"   traced Python memory: {total / sockets:,.0f} bytes per socket")
    for stat in stats[:top]:
        frame = stat.traceback[0]
        print(
            f"   {stat.size_diff / sockets:8,.0f} B  {stat.count_diff / sockets:6.2f} blocks  "
            f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}"
        )
    print("\n-- growth per socket by allocating file")
    for stat in after.compare_to(before, "filename")[:top]:
        name = stat.traceback[0].filename.split("site-packages/")[-1].split("/work/main/")[-1]
        print(f"   {stat.size_diff / sockets:8,.0f} B  {name}")
    print("\n-- growth per socket by the innermost frame of our code or the frameworks")
    owners: dict[str, int] = {}
    for stat in after.compare_to(before, "traceback"):
        owner = "?"
        for frame in reversed(stat.traceback):  # tracebacks run oldest first
            name = frame.filename
            if "/services/" in name or any(
                lib in name
                for lib in (
                    "/litestar/",
                    "/uvicorn/",
                    "/websockets/",
                    "/wsproto/",
                    "/h11/",
                    "/redis/",
                    "/asyncio/",
                )
            ):
                owner = (
                    f"{name.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno}"
                )
                break
        owners[owner] = owners.get(owner, 0) + stat.size_diff
    for owner, size in sorted(owners.items(), key=lambda kv: -kv[1])[:top]:
        print(f"   {size / sockets:8,.0f} B  {owner}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--frames", type=int, default=12, help="traceback depth; 0: no tracing")
    parser.add_argument(
        "--ws", default="", help="what-if: run uvicorn with this ws implementation instead"
    )
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    raise_open_files()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]), args.frames, args.ws)
        return 0

    from services.cli.embedded import RedisServer, free_port
    from services.cli.stack import LocalStack
    from services.core.auth import issue_token
    from services.core.settings import load_settings

    settings = load_settings(jwt_secret=SECRET)
    tokens = {
        f"bench-{i}": issue_token(settings, tenant_id=f"bench-{i}", user_id="u", ttl_seconds=3600)
        for i in range(8)
    }
    redis = RedisServer().start()
    directory = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = LocalStack.for_redis(
        redis.url,
        jwt_secret=SECRET,
        default_tier="enterprise",
        tiers='{"enterprise": {"maxConnections": 1000000}}',
        max_websocket_connections="100000",
        metrics_port="0",
        log_level="WARNING",
    ).env
    env["PYTHONPATH"] = str(REPO)
    port = free_port()
    process = subprocess.Popen(  # noqa: S603 (this module, no shell)
        [sys.executable, "-m", "bench.memory_profile", "--frames", str(args.frames),
         "--ws", args.ws, "--serve", str(port), str(directory)],
        cwd=REPO,
        env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("api did not start")
            time.sleep(0.1)

        async def scenario() -> None:
            warm = await open_sockets(port, tokens, 900_000, 50)
            await asyncio.sleep(2)
            rss0 = rss_bytes(process.pid)
            before = await asyncio.to_thread(snapshot, process, directory, 1)
            socks = await open_sockets(port, tokens, 0, args.sockets)
            await asyncio.sleep(3)
            rss1 = rss_bytes(process.pid)
            after = await asyncio.to_thread(snapshot, process, directory, 2)
            traced = "traced" if args.frames else "untraced"
            print(f"RSS delta per socket ({traced}): {(rss1 - rss0) / args.sockets:,.0f} B")
            if before is not None and after is not None:
                report(before, after, args.sockets, args.top)
            for ws in [*socks, *warm]:
                ws.close()

        asyncio.run(scenario())
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        redis.cleanup()
        for path in directory.glob("*"):
            path.unlink()
        directory.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
