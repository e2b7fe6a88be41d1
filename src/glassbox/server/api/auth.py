"""Who is calling: API keys as a FastAPI dependency, and the per-key rate limiter.

Offers:
    ApiKey                 ``key: ApiKey`` in a route's signature: the caller's KeyInfo, or 401
    key_of(websocket)      the same for a websocket (header, query, or a first JSON message), or None
    RateLimiter(per_minute).hit(key_id) -> None | seconds to wait
    in_thread(fn, *args)   run a synchronous call (the store) off the event loop
    MISSING_KEY, BAD_KEY   what a 401 says

Keys travel as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the websocket also takes
``{"api_key": ...}`` as its first message. Only the key's sha256 is stored (``store.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, HTTPException, Request, WebSocket

from ..store import KeyInfo

__all__ = ["BAD_KEY", "MISSING_KEY", "ApiKey", "RateLimiter", "in_thread", "key_of"]

_WS_AUTH_SECONDS = 10.0
MISSING_KEY = (
    "missing API key: send it as `Authorization: Bearer <key>` or `X-API-Key: <key>` "
    "(glassbox clients read glassbox.CONFIG.API_KEY or GLASSBOX_API_KEY)"
)
BAD_KEY = "API key rejected: it is unknown to this server or was revoked"


async def in_thread(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """The store is synchronous (SQLAlchemy); keep the event loop free while it works."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def presented_key(headers: Any) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or None



async def _current_key(request: Request) -> KeyInfo:
    key = presented_key(request.headers)
    if not key:
        raise HTTPException(401, MISSING_KEY, headers={"WWW-Authenticate": "Bearer"})
    info = await in_thread(request.app.state.store.authenticate, key)
    if info is None:
        raise HTTPException(401, BAD_KEY, headers={"WWW-Authenticate": "Bearer"})
    return info


ApiKey = Annotated[KeyInfo, Depends(_current_key)]


async def key_of(websocket: WebSocket) -> tuple[KeyInfo | None, str | None]:
    """The websocket caller's key (None if missing or unknown) and the key text it presented."""
    key = (presented_key(websocket.headers) or websocket.query_params.get("api_key")
           or websocket.query_params.get("key"))
    if not key:
        try:
            first = await asyncio.wait_for(websocket.receive_json(), _WS_AUTH_SECONDS)
        except (asyncio.TimeoutError, ValueError):
            first = None
        key = first.get("api_key") if isinstance(first, dict) else None
    if not isinstance(key, str) or not key:
        return None, None
    return await in_thread(websocket.app.state.store.authenticate, key), key


class RateLimiter:
    """At most ``per_minute`` hits per key in any 60-second window (0: no limit).

        limiter = RateLimiter(2)
        assert limiter.hit("k") is None and limiter.hit("k") is None
        assert limiter.hit("k") > 0      # seconds until the next hit is allowed
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, key_id: str, now: float | None = None) -> float | None:
        """Count one hit; None if allowed, else the seconds to wait (the hit is not counted)."""
        if not self.per_minute:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            hits = self._hits[key_id]
            while hits and hits[0] <= now - 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return max(0.1, hits[0] + 60.0 - now)
            hits.append(now)
            return None
