"""What one api process holds while it runs, created in the app's lifespan and injected."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from services.api.admission import Admission
from services.api.chat_service import ChatService
from services.api.delivery import SessionHub
from services.api.single_flight import SingleFlight
from services.core.auth import TokenVerifier
from services.core.settings import Settings
from services.persistence.history import HistoryStore


@dataclass
class Runtime:
    settings: Settings
    pod_id: str
    redis: Redis
    verifier: TokenVerifier
    hub: SessionHub
    chat: ChatService
    admission: Admission
    history: HistoryStore | None = None
    database: AsyncEngine | None = None
    draining: bool = False
    # Sockets admitted by the pod-full check and not attached to the hub yet: the handshake
    # awaits Redis in between, so a storm would otherwise pass the check all at once.
    admitting: int = 0
    drained: asyncio.Event | None = None
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # `/health/detailed`'s answer (body, status) while one is being made (health.py).
    detailed_health: SingleFlight[tuple[dict[str, Any], int]] = field(default_factory=SingleFlight)
