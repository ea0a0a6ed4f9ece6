"""The `orchestrator` command: the top floor that wires the services together.

Nothing imports this package; it imports the services. Configuration errors end the process
with one line naming the variable and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
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


MAX_USER_CHARS = 255
MAX_TOKEN_TTL_SECONDS = 366 * 86_400


def _run_token(args: argparse.Namespace, settings: Settings) -> int:
    from services.core.auth import issue_token
    from services.core.ids import is_valid_id

    if not is_valid_id(args.tenant):
        raise ConfigError("--tenant: must match [A-Za-z0-9_-]{1,64}")
    if not args.user.strip() or len(args.user) > MAX_USER_CHARS:
        raise ConfigError(f"--user: must be 1 to {MAX_USER_CHARS} characters, not blank")
    if "\x00" in args.user or any("\ud800" <= char <= "\udfff" for char in args.user):
        # Bytes that are not UTF-8 arrive as lone surrogates: the api refuses such a `sub`.
        raise ConfigError("--user: must be UTF-8 text without NUL (the api refuses others)")
    if not 1 <= args.ttl <= MAX_TOKEN_TTL_SECONDS:
        raise ConfigError(f"--ttl: must be 1 to {MAX_TOKEN_TTL_SECONDS} seconds (a year)")
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
    try:
        written = write_schemas(args.dir)
    except OSError as exc:
        raise ConfigError(f"--dir {args.dir}: {exc.strerror or exc}") from None
    for path in written:
        print(path)
    return 0


def _run_tenants(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from services.cli import tenants

    if args.action == "set":
        return asyncio.run(
            tenants.set_command(
                settings,
                args.tenant,
                tier=args.tier,
                limits=args.limit,
                allowed_agents=args.allowed_agents,
                force=args.force,
            )
        )
    if args.action == "get":
        return asyncio.run(tenants.get_command(settings, args.tenant))
    if args.action == "delete":
        return asyncio.run(tenants.delete_command(settings, args.tenant, force=args.force))
    return asyncio.run(tenants.list_command(settings, after=args.after, limit=args.limit))


def _run_deadletters(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from services.cli import deadletters

    if args.action == "list":
        return asyncio.run(
            deadletters.list_command(
                settings,
                limit=args.limit,
                after=args.after,
                newest=args.newest,
                as_json=args.json,
            )
        )
    if args.action == "discard":
        return asyncio.run(deadletters.discard_command(settings, args.ids))
    return asyncio.run(
        deadletters.replay_command(settings, args.ids, replay_all=args.all, as_json=args.json)
    )


def _run_partitions(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from services.cli import partitions

    if args.action == "set":
        return asyncio.run(partitions.set_command(settings, args.count, force=args.force))
    return asyncio.run(partitions.show_command(settings))


def _run_operator(args: argparse.Namespace, settings: Settings) -> int:
    from services.operator.main import configure_operator_logging, run_operator
    from services.operator.settings import load_operator_settings

    operator_settings = load_operator_settings()
    configure_operator_logging(settings.log_level)
    return run_operator(
        settings,
        operator_settings,
        namespaces=args.namespace,
        all_namespaces=args.all_namespaces,
        standalone=True if args.standalone else None,
        priority=args.priority,
    )


def _run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from services.persistence.cli import migrate_command

    if not settings.database_url:
        raise ConfigError("ORCHESTRATOR_DATABASE_URL: must be set to migrate")
    return migrate_command(settings, args.down)


def _run_prune(_: argparse.Namespace, settings: Settings) -> int:
    from services.persistence.cli import prune_command

    if not settings.database_url:
        raise ConfigError("ORCHESTRATOR_DATABASE_URL: must be set to prune")
    return prune_command(settings)


REDIS_COMMANDS = ("api", "worker", "executor", "operator", "tenants", "deadletters", "partitions")
LONG_RUNNING = ("api", "worker", "executor", "operator", "dev")
LOGGED_AS_JSON = ("api", "worker", "executor")  # `configure_logging` ran before their handler
PARTITIONED = ("api", "worker")  # they compute and read callback partitions


def _verify_redis(settings: Settings, command: str) -> None:
    """A wrong `ORCHESTRATOR_REDIS_MODE` for the server reached stops here with one line, and
    so does an api's or a worker's `CALLBACK_PARTITIONS` other than the installation's."""
    import asyncio

    from services.core.redis_client import verify_topology

    asyncio.run(verify_topology(settings, claim_partitions=command in PARTITIONED))


def _run_bench(bench_args: list[str]) -> int:
    """The side-by-side benchmark lives in the repository's bench/ (it starts the peers too);
    its own options (--quick, --json PATH, --scenario, --help) pass through untouched."""
    runner = Path.cwd() / "bench" / "run.py"
    if not runner.exists():
        print("orchestrator bench: run it from the repository root (bench/run.py)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(runner.parent.parent))
    bench_run = importlib.import_module("bench.run")
    return int(bench_run.main(bench_args))


def _run_async(main: object) -> None:
    import uvloop

    uvloop.run(main)  # type: ignore[arg-type]


def _port(text: str) -> int:
    """A TCP port: argparse took any int, and uvloop served 99 999 on 34 463 (16 bits)."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1-65535)")
    return port


def _partition_count(text: str) -> int:
    """A count `ORCHESTRATOR_CALLBACK_PARTITIONS` accepts (1-1024)."""
    from services.cli.partitions import MAX_PARTITIONS

    try:
        count = int(text)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_PARTITIONS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of partitions (1-1024)")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Agent Orchestrator: realtime gateway for AI agents"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = commands.add_parser("api", help="serve the REST and WebSocket API (uvicorn)")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=_port, default=8000)
    api.set_defaults(handler=_run_api)

    commands.add_parser("worker", help="consume AES callbacks and deliver events").set_defaults(
        handler=_run_worker
    )
    commands.add_parser("executor", help="run the reference execution service").set_defaults(
        handler=_run_executor
    )

    dev = commands.add_parser("dev", help="run everything locally with an embedded Redis")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=_port, default=8000)
    dev.add_argument(
        "--redis-mode",
        choices=["standalone", "cluster", "sentinel"],
        default="standalone",
        help="one embedded server (default), a local 3-master cluster, or a primary, a "
        "replica and 3 sentinels",
    )
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

    tenants = commands.add_parser("tenants", help="read and write the quota store")
    tenant_actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    tenant_set = tenant_actions.add_parser("set", help="replace a tenant's tier and limits")
    tenant_set.add_argument("tenant")
    tenant_set.add_argument("--tier", required=True)
    tenant_set.add_argument(
        "--limit",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override limits of the tier (one or more; repeatable), e.g. tokensPerDay=unlimited",
    )
    tenant_set.add_argument(
        "--allowed-agents",
        metavar="A,B",
        help="comma-separated agent ids ('' allows every agent; default: the tier's list)",
    )
    for action in (
        tenant_set,
        tenant_delete := tenant_actions.add_parser("delete", help="remove a tenant's record"),
    ):
        action.add_argument(
            "--force",
            action="store_true",
            help="write a tenant a TierQuota manages (the operator puts its spec back)",
        )
    tenant_get = tenant_actions.add_parser("get", help="a tenant's record and effective limits")
    tenant_get.add_argument("tenant")
    tenant_list = tenant_actions.add_parser(
        "list", help="every tenant's record, by tenant id (JSON array)"
    )
    tenant_list.add_argument("--limit", type=int, help="at most N (default: all)")
    tenant_list.add_argument(
        "--after",
        metavar="TENANT",
        help="only tenants after this one (the last shown; --after=TENANT for an id "
        "starting with -)",
    )
    tenant_delete.add_argument("tenant")
    tenants.set_defaults(handler=_run_tenants)

    dead = commands.add_parser(
        "deadletters", help="show, re-enqueue or discard dead-lettered actions"
    )
    dead_actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    dead_list = dead_actions.add_parser("list", help="the dead letters, oldest first")
    dead_list.add_argument("--limit", type=int, default=100, help="at most N (default 100)")
    dead_list.add_argument(
        "--after",
        metavar="ID",
        help="only dead letters after this id (the last one shown): the next page",
    )
    dead_list.add_argument(
        "--newest",
        action="store_true",
        help="the --limit newest dead letters (what keeps failing now) instead of the oldest",
    )
    dead_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    dead_replay = dead_actions.add_parser("replay", help="re-add dead letters to their stream")
    dead_replay.add_argument("ids", nargs="*", metavar="ID")
    dead_replay.add_argument("--all", action="store_true", help="replay every dead letter")
    dead_replay.add_argument("--json", action="store_true", help="the results as a JSON array")
    dead_discard = dead_actions.add_parser(
        "discard", help="delete dead letters for good, without re-adding their action"
    )
    dead_discard.add_argument("ids", nargs="+", metavar="ID")
    dead.set_defaults(handler=_run_deadletters)

    partitions = commands.add_parser(
        "partitions",
        help="the installation's CALLBACK_PARTITIONS and what its partitions hold; set: change "
        "it once they hold nothing",
    )
    partition_actions = partitions.add_subparsers(dest="action", metavar="ACTION")
    partition_set = partition_actions.add_parser(
        "set", help="record another count (refused while tasks are in flight)"
    )
    partition_set.add_argument("count", type=_partition_count, metavar="N")
    partition_set.add_argument(
        "--force",
        action="store_true",
        help="change it while tasks are in flight (their answers and deadlines are lost)",
    )
    partitions.set_defaults(handler=_run_partitions)

    commands.add_parser(
        "bench", help="the side-by-side benchmark: us and the peers (--quick, --json PATH, --help)"
    )

    migrate = commands.add_parser("migrate", help="apply the PostgreSQL migrations")
    migrate.add_argument("--down", metavar="REVISION", help="migrate down to REVISION instead")
    migrate.set_defaults(handler=_run_migrate)
    commands.add_parser(
        "prune", help="delete history older than ORCHESTRATOR_HISTORY_RETENTION_DAYS"
    ).set_defaults(handler=_run_prune)

    operator = commands.add_parser("operator", help="run the TierQuota operator (kopf)")
    operator.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; default: ORCHESTRATOR_OPERATOR_NAMESPACES, "
        "else every namespace)",
    )
    operator.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace"
    )
    operator.add_argument("--standalone", action="store_true", help="run without kopf peering")
    operator.add_argument(
        "--priority", type=int, help="kopf peering priority (default: random per replica)"
    )
    operator.set_defaults(handler=_run_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return _run_bench(arguments[1:])
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace, Settings], int] = args.handler
    try:
        settings = load_settings()
        if args.command in ("api", "worker", "executor"):
            # Before Redis is verified: its warnings (an evicting policy) are JSON lines too.
            from services.core.logs import configure_logging
            from services.core.telemetry import configure_tracing

            configure_logging(settings.log_level, args.command)
            configure_tracing(args.command)
        if args.command in REDIS_COMMANDS:
            _verify_redis(settings, args.command)
        return handler(args, settings)
    except ConfigError as exc:
        print(f"orchestrator: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command in LOGGED_AS_JSON:
            # A service's crash: its traceback is what its operator needs, as a JSON line
            # like every other one (a bare traceback is 45 lines no log pipeline can read).
            logging.getLogger("services.cli").critical(
                "%s stopped: %s: %s", args.command, type(exc).__name__, exc, exc_info=exc
            )
            return 1
        if args.command in LONG_RUNNING:
            raise  # a service's crash: its traceback is what its operator needs
        # A one-shot command: one line, not a traceback (DESIGN: errors name the problem).
        print(f"orchestrator {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
