"""An identity provider's signing keys, read from its `jwks_uri` and kept fresh.

Providers rotate their keys on their own schedule (some every few days) and start signing
with a new key once it is in their published set: a copy of the set pasted into the
deployment breaks every client at the provider's next rotation. So the api reads the set
itself, again every `ORCHESTRATOR_JWT_JWKS_REFRESH_SECONDS`, and at once when a token names a
`kid` it does not know (no sooner than `MIN_REFRESH_SECONDS` after the last read began, so
that tokens with made-up ids cannot make it hammer the provider). Such a token is answered 503
with `Retry-After` until a read begun after it was first seen has answered; a 401 only then,
since a client told 401 signs its user out. A failed read keeps the keys it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from http.client import HTTPMessage
from typing import IO
from urllib.parse import urlsplit

from services.core.jwt_keys import MAX_KEYS, VerificationKey, key_set
from services.core.settings import ConfigError
from services.core.task_stop import cancel_and_wait

log = logging.getLogger(__name__)

VARIABLE = "ORCHESTRATOR_JWT_JWKS_URL"
MIN_REFRESH_SECONDS = 10.0
MAX_MISSING_KIDS = 1024  # made-up ids remembered (to answer 401 after a read lacked them)
RETRY_UNLOADED_SECONDS = 5.0  # until the first set is read: nothing verifies meanwhile
FETCH_TIMEOUT_SECONDS = 5.0
MAX_DOCUMENT_BYTES = 1 << 20  # providers' sets are a few kilobytes


class _RedirectWithinHttps(urllib.request.HTTPRedirectHandler):
    """Follows a redirect to https only (or to http when the set's own URL is http, as on a
    developer's machine). urllib would follow one from https to http, and to ftp: a key set
    read in the clear can be swapped on the way, and whoever swaps it signs any tenant's
    tokens."""

    max_redirections = 5

    def __init__(self, allow_http: bool) -> None:
        self._allowed = ("https", "http") if allow_http else ("https",)

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urlsplit(newurl).scheme
        if scheme not in self._allowed:
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"a redirect to {scheme or 'an unknown scheme'}:// is refused "
                f"(only {' or '.join(self._allowed)} is followed)",
                headers,
                fp,
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class KeySetSource:
    """The provider's current keys, for one api process (`TokenVerifier.source`)."""

    def __init__(
        self,
        url: str,
        algorithm: str,
        refresh_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._opener = urllib.request.build_opener(
            _RedirectWithinHttps(allow_http=url.startswith("http://"))
        )
        self._algorithm = algorithm
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self.keys: list[VerificationKey] = []
        self.generation = 0  # counts the reads that removed a key (the verifier's cache)
        self._read_started: float | None = None  # when the latest read began
        self._answered: float | None = None  # when the latest successful read began
        # The ids asked for that the set lacked, and when each was first asked for.
        self._missing: OrderedDict[str, float] = OrderedDict()
        self._refreshing: asyncio.Task[None] | None = None
        self._chasing: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def loaded(self) -> bool:
        return bool(self.keys)

    async def start(self, wait: float = FETCH_TIMEOUT_SECONDS * 2) -> None:
        """Read the set (bounded by `wait`), then keep it fresh in the background. A provider
        unreachable at start does not stop the pod: it is not ready until a set is read."""
        first = self._refresh_now()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(first), wait)
        if not self.loaded:
            log.warning("no JWT signing keys read from %s yet; retrying", self.url)
        self._loop_task = asyncio.get_running_loop().create_task(
            self._keep_fresh(), name="jwks-refresh"
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._loop_task, self._chasing, self._refreshing)
        self._loop_task = self._chasing = self._refreshing = None

    def knows(self, kid: str) -> bool:
        return any(key.kid == kid for key in self.keys)

    def wait_for(self, kid: str) -> float | None:
        """For a `kid` the set lacks: seconds until a read that may bring it (one is
        scheduled), or None once a read begun after the kid was first asked for succeeded
        without it (a token no key of the provider signed: a 401)."""
        now = self._clock()
        first = self._missing.get(kid)
        if first is None:
            first = self._missing[kid] = now
            if len(self._missing) > MAX_MISSING_KIDS:
                self._missing.popitem(last=False)
        if self._answered is not None and self._answered >= first:
            if now - self._answered < MIN_REFRESH_SECONDS:
                return None  # a read begun after it was asked for lacked it: not the provider's
            # The provider may have published it since (its set lags its signers, or the id
            # was guessed and asked for ahead of the rotation): asked for anew.
            first = self._missing[kid] = now
        if self._chasing is None or self._chasing.done():
            self._chasing = asyncio.get_running_loop().create_task(self._chase(), name="jwks-kid")
        return max(self._next_read_at() - now, 0.0) + FETCH_TIMEOUT_SECONDS / 5

    def _next_read_at(self) -> float:
        started = self._read_started
        return self._clock() if started is None else started + MIN_REFRESH_SECONDS

    async def _chase(self) -> None:
        """Read the set again (no sooner than MIN_REFRESH_SECONDS after the last read began)
        while a `kid` asked for is newer than the last successful read."""
        while self._missing and (
            self._answered is None or max(self._missing.values()) > self._answered
        ):
            await asyncio.sleep(max(self._next_read_at() - self._clock(), 0.0))
            await self._refresh_now()

    def _refresh_now(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(
                self._refresh(), name="jwks-read"
            )
        return self._refreshing

    async def _keep_fresh(self) -> None:
        while True:
            pause = self._refresh_seconds if self.loaded else RETRY_UNLOADED_SECONDS
            await asyncio.sleep(pause)
            await self._refresh_now()

    async def _refresh(self) -> None:
        started = self._read_started = self._clock()
        try:
            # Bounded here too: a name lookup has no timeout of its own, and a read in hand is
            # what every later caller waits for.
            document = await asyncio.wait_for(
                asyncio.to_thread(self._fetch), FETCH_TIMEOUT_SECONDS * 2
            )
            keys = key_set(self._algorithm, document, VARIABLE, strict=False)
        except Exception as exc:
            why = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.warning(
                "reading the JWT signing keys failed; keeping the %d keys read before: %s",
                len(self.keys),
                why,
                extra={"url": self.url},
            )
        else:
            if len(keys) > MAX_KEYS:  # each one a signature check for a token none verifies
                log.warning(
                    "the JWT key set holds %d usable keys; the first %d are used",
                    len(keys),
                    MAX_KEYS,
                )
                keys = keys[:MAX_KEYS]
            if {key.kid for key in keys} != {key.kid for key in self.keys}:
                log.info("JWT signing keys read: %s", ", ".join(str(k.kid) for k in keys))
            kept = [k.identity for k in keys]
            if any(key.identity not in kept for key in self.keys):
                self.generation += 1  # a key left the set: tokens it verified must not stay
            self.keys = keys
            self._answered = started
            for key in keys:
                self._missing.pop(str(key.kid), None)

    def _fetch(self) -> str:
        """The set's document (blocking: run in a thread). A redirect is followed (providers
        move their sets) if it keeps to https; an answer other than 200 or larger than
        MAX_DOCUMENT_BYTES fails."""
        request = urllib.request.Request(  # noqa: S310 (the scheme is checked in Settings)
            self.url, headers={"Accept": "application/json"}
        )
        deadline = time.monotonic() + FETCH_TIMEOUT_SECONDS
        body = bytearray()
        with self._opener.open(request, timeout=FETCH_TIMEOUT_SECONDS) as answer:
            if answer.status != 200:
                raise ValueError(f"HTTP {answer.status}")
            kind = answer.headers.get("Content-Type", "")
            # The timeout bounds each wait for data, not the read: a provider (or a proxy)
            # sending a byte now and then would hold it for ever, and every later read with it.
            while chunk := answer.read1(65536):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ValueError(f"the document is over {MAX_DOCUMENT_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the document took over {FETCH_TIMEOUT_SECONDS:.0f} s")
        text = body.decode()
        if not text.lstrip().startswith("{"):
            raise ValueError(f"not a JSON Web Key Set ({kind or 'no Content-Type'}): {text[:40]!r}")
        return text
