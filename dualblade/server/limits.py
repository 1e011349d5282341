"""What the server accepts: its limits, and the middleware that holds request bodies to --max-body."""
from __future__ import annotations

from dataclasses import dataclass

from .api import ApiError


@dataclass
class Limits:
    max_tokens: int  # the most a request may generate (and its default)
    queue: int       # requests that may wait for the model
    max_body: int    # bytes of a request body


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413, read no further."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await ApiError(400, "Content-Length is not a number").response()(scope, receive, send)
                if n > self.limit:
                    return await self._too_large()(scope, receive, send)
        seen = 0
        started = False

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self):
        return ApiError(413, f"the request body is larger than this server accepts ({self.limit} bytes)",
                        code="request_too_large").response()


class _TooLarge(Exception):
    pass
