"""What one accepted send costs in Redis: commands per send, counted by the server itself.

Starts an embedded Redis and one api process (no worker or executor, so nothing else talks
to Redis), warms the tenant's quota cache, resets the server's command statistics, sends N
messages over REST and prints `INFO commandstats` divided by N. The round trips follow from
how the commands are pipelined (see services/api/admission.py and chat_service.py).
Run: `python bench/send_commands.py [--messages 200]`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import httpx
from redis.asyncio import Redis

from services.cli.embedded import RedisServer
from services.cli.stack import LocalStack
from services.core.auth import issue_token
from services.core.settings import load_settings

SECRET = "send-commands-secret-" + "q" * 24


async def measure(api_url: str, redis_url: str, messages: int) -> dict[str, float]:
    token = issue_token(
        load_settings(jwt_secret=SECRET), tenant_id="bench", user_id="u", ttl_seconds=3600
    )
    redis = Redis.from_url(redis_url)
    async with httpx.AsyncClient(
        base_url=api_url, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        body = {"message": "count my commands", "session_id": "commands"}
        assert (await http.post("/api/chat/send", json=body)).status_code == 202  # warm up
        await redis.config_resetstat()
        for _ in range(messages):
            reply = await http.post("/api/chat/send", json=body)
            assert reply.status_code == 202, reply.text
    stats = await redis.info("commandstats")
    await redis.aclose()
    return {
        name.removeprefix("cmdstat_"): value["calls"] / messages
        for name, value in stats.items()
        if isinstance(value, dict) and name not in ("cmdstat_config", "cmdstat_info")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    redis = RedisServer().start()
    logs = Path(tempfile.mkdtemp(prefix="send-commands-"))
    stack = LocalStack.for_redis(
        redis.url, log_dir=logs, jwt_secret=SECRET, default_tier="enterprise", log_level="WARNING"
    )
    try:
        api = stack.start_api()
        stack.wait_ready(api)
        per_send = asyncio.run(measure(api.url, redis.url, args.messages))
    finally:
        stack.stop()
        redis.cleanup()
    for name, calls in sorted(per_send.items(), key=lambda item: -item[1]):
        print(f"{name:>12}: {calls:.2f} per send")
    print(f"{'total':>12}: {sum(per_send.values()):.2f} commands per accepted send")


if __name__ == "__main__":
    main()
