"""The `orchestrator` command: the top floor that wires the services together.

Nothing imports this package; it imports the services. Configuration errors end the process
with one line naming the variable and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from services.core.settings import ConfigError, Settings, load_settings

DEFAULT_SCHEMA_DIR = Path("schemas")


def _run_api(args: argparse.Namespace, settings: Settings) -> int:
    from services.cli.serve_api import serve_api

    serve_api(settings, host=args.host, port=args.port)
    return 0


def _run_worker(_: argparse.Namespace, settings: Settings) -> int:
    from services.worker.main import serve

    _run_async(serve(settings))
    return 0


def _run_executor(_: argparse.Namespace, settings: Settings) -> int:
    from services.executor.main import serve

    _run_async(serve(settings))
    return 0


def _run_dev(args: argparse.Namespace, _: Settings) -> int:
    from services.cli.dev import run_dev

    return run_dev(host=args.host, port=args.port, redis_mode=args.redis_mode)


def _run_token(args: argparse.Namespace, settings: Settings) -> int:
    from services.core.auth import issue_token
    from services.core.ids import is_valid_id

    if not is_valid_id(args.tenant):
        raise ConfigError("--tenant: must match [A-Za-z0-9_-]{1,64}")
    if args.ttl < 1:
        raise ConfigError("--ttl: must be at least 1 second")
    print(issue_token(settings, tenant_id=args.tenant, user_id=args.user, ttl_seconds=args.ttl))
    return 0


def _run_schemas(args: argparse.Namespace, _: Settings) -> int:
    from services.core.schemas import stale_schemas, write_schemas

    if args.check:
        stale = stale_schemas(args.dir)
        if stale:
            print(f"stale schemas in {args.dir}: {', '.join(stale)}; run `orchestrator schemas`")
            return 1
        print(f"schemas in {args.dir} are up to date")
        return 0
    for path in write_schemas(args.dir):
        print(path)
    return 0


def _run_async(main: object) -> None:
    import uvloop

    uvloop.run(main)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Agent Orchestrator: realtime gateway for AI agents"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = commands.add_parser("api", help="serve the REST and WebSocket API (uvicorn)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.set_defaults(handler=_run_api)

    commands.add_parser("worker", help="consume AES callbacks and deliver events").set_defaults(
        handler=_run_worker
    )
    commands.add_parser("executor", help="run the reference execution service").set_defaults(
        handler=_run_executor
    )

    dev = commands.add_parser("dev", help="run everything locally with an embedded Redis")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--redis-mode", choices=["standalone"], default="standalone")
    dev.set_defaults(handler=_run_dev)

    token = commands.add_parser("token", help="print a signed client token")
    token.add_argument("--tenant", required=True)
    token.add_argument("--user", required=True)
    token.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    token.set_defaults(handler=_run_token)

    schemas = commands.add_parser("schemas", help="generate the actions' JSON Schemas")
    schemas.add_argument("--dir", type=Path, default=DEFAULT_SCHEMA_DIR)
    schemas.add_argument("--check", action="store_true", help="fail if the files are stale")
    schemas.set_defaults(handler=_run_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        settings = load_settings()
        if args.command in ("api", "worker", "executor"):
            from services.core.logs import configure_logging

            configure_logging(settings.log_level, args.command)
        return handler(args, settings)
    except ConfigError as exc:
        print(f"orchestrator: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
