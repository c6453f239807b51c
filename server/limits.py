"""Request-body limits in front of the app: size (413) and read time (408).

A pure ASGI middleware, so it acts before FastAPI parses anything: a body
whose ``Content-Length`` is over the limit is refused at once without reading
it; a chunked body is counted as it arrives and refused as soon as it passes
the limit; a body that trickles in (slow-loris) is cut off when its whole read
takes longer than the deadline. Errors have OpenAI's shape. The buffered body
is then replayed to the app, and later ``receive`` calls (disconnect
detection while a response is generated) go to the server as before.

:class:`ErrorShieldMiddleware` turns an unexpected exception into a 500 in
OpenAI's shape without logging its text (an exception message can quote the
prompt); the traceback is logged at debug level only.

Not for: rate limits or auth (see :mod:`distillgame.server.policy`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` (413) or slower than ``timeout_s`` to arrive (408)."""

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _reject(send, 413, self._too_large(declared), "request_too_large", close=True)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                message = await asyncio.wait_for(receive(), timeout=left)
            except asyncio.TimeoutError:
                logger.info("request body not received within %.0f s; refused", self.timeout_s)
                await _reject(send, 408, f"the request body did not arrive within {self.timeout_s:g} s",
                              "request_timeout", close=True)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await _reject(send, 413, self._too_large(size), "request_too_large", close=True)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(send: Send, status: int, message: str, code: str, close: bool = False) -> None:
    await send_error(send, status, message, code=code, close=close)


async def send_error(send: Send, status: int, message: str, *, type: str = "invalid_request_error",
                     code: str | None = None, param: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None, close: bool = False) -> None:
    """Answer an ASGI request with an error in OpenAI's shape ``{"error": {message, type, param, code}}``."""
    body = json.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}).encode()
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    out.extend(headers or ())
    if close:
        # The rest of the body is never read: the connection cannot be reused.
        out.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


class ErrorShieldMiddleware:
    """Last-resort handler: a 500 in OpenAI's shape, and only the exception's type in the log."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            logger.error("unhandled %s on %s", type(exc).__name__, scope.get("path"))
            logger.debug("unhandled exception", exc_info=exc)
            if not started:
                body = json.dumps({"error": {"message": "internal error", "type": "server_error", "param": None,
                                             "code": "internal_error"}}).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
