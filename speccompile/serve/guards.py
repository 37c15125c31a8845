"""What the server checks before a route reads a request's body: the API key, and the body's size. FastAPI reads and
parses a whole body before a route's dependencies run, so both are ASGI middleware on the raw request."""
from __future__ import annotations

import secrets

from starlette.datastructures import Headers

from speccompile.serve.api_errors import APIError

# A prompt can hold at most the compiled context's tokens; a token's text, JSON-escaped, is far below this.
BODY_BYTES_PER_CONTEXT_TOKEN = 1024
MIN_BODY_BYTES = 1 << 20
TOO_LARGE, CLIENT_GONE = object(), object()


def body_limit(max_seq_len: int) -> int:
    """The largest request body the server takes in: one that could still fit the compiled context."""
    return max(MIN_BODY_BYTES, BODY_BYTES_PER_CONTEXT_TOKEN * max_seq_len)


def _guarded(scope) -> bool:
    return scope["type"] == "http" and scope["path"].startswith("/v1/")  # `/health` and `/metrics` stay open


class KeyBeforeBody:
    """The API key checked on a request's headers before anything reads its body: a check in a route let a client
    without the key make the server hold a body of any size in memory, and parse it, before its 401."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if _guarded(scope) and not self._authorized(Headers(scope=scope)):
            response = APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}).response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.key.encode())


class BodyLimit:
    """A body over `limit` bytes is refused with 413 before the app parses it: as announced by Content-Length at
    once, and a chunked one as soon as its bytes pass the limit. The body read here is handed on to the app, so
    memory stays bounded by the limit whatever a client sends."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if not _guarded(scope):
            await self.app(scope, receive, send)
            return
        announced = Headers(scope=scope).get("content-length", "")
        body = TOO_LARGE if announced.isdigit() and int(announced) > self.limit else await self._read(receive)
        if body is TOO_LARGE:
            await self._too_large().response()(scope, receive, send)
        elif body is not CLIENT_GONE:
            await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive):
        """The whole body; TOO_LARGE once it passes the limit; CLIENT_GONE if the client left before sending it."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return CLIENT_GONE
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                return TOO_LARGE
            if not message.get("more_body", False):
                return b"".join(parts)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is over {self.limit} bytes, more than a prompt that fits this "
                        "model's compiled context could need", code="request_too_large")


def _replay(body: bytes, receive):
    """A receive that gives the app `body` whole first, then what the client sends next (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed
