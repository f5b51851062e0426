"""Request body size limits: declarations up to 8 MiB, every other body 64 KiB.

Checked before anything parses the body: a declared ``Content-Length`` over the limit
is refused unread, and a body sent without one (chunked) is refused as soon as it
grows past the limit. Either way the answer is 413 with the usual error body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from notice_relay.api.errors import error_response
from notice_relay.validate import MAX_BYTES as MAX_DECLARATION_BYTES

MAX_BODY_BYTES = 64 * 1024

__all__ = ["MAX_BODY_BYTES", "MAX_DECLARATION_BYTES", "BodyLimitMiddleware", "limit_for"]


def limit_for(scope: Scope) -> int:
    """The body limit of a request."""
    if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/declarations":
        return MAX_DECLARATION_BYTES
    return MAX_BODY_BYTES


class BodyLimitMiddleware:
    """Reads the body, at most its limit, before the app sees the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope)
        declared = [v for k, v in scope.get("headers", []) if k.lower() == b"content-length"]
        if declared:
            try:
                size = int(declared[0])
            except ValueError:
                await self._refuse(scope, receive, send, 400, "bad_request",
                                   "Content-Length is not a number")
                return
            if size > limit:
                await self._too_large(scope, receive, send, limit)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away before sending its body.
                return
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._too_large(scope, receive, send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        buffered: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                    "more_body": False}]

        async def replay() -> Message:
            # The whole body once, then whatever the server says next (a disconnect).
            if buffered:
                return buffered.pop()
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        await self._refuse(scope, receive, send, 413, "payload_too_large",
                           f"request body too large: the limit is {limit:,} bytes")

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str,
                      reason: str) -> None:
        response = error_response(status, code, reason, headers={"Connection": "close"})
        await response(scope, receive, send)
