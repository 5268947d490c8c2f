"""HTTP Basic auth and a request-body size limit, as plain ASGI middleware.

Both answer in the server's JSON error shape (see :mod:`opensd.serving.errors`) and run
before any route: a request over the size limit or without valid credentials never
reaches the generation queue. Credentials are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import HTTPException

from opensd.errors import OpenSDError
from opensd.serving.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuthSpecError(OpenSDError):
    """``--api-auth`` (or ``create_app(auth=...)``) is not a list of non-blank ``user:password`` pairs."""

    kind = "AuthSpecError"


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """``"user:pass"`` or ``"u1:p1,u2:p2"`` (A1111's ``--api-auth``) -> credential pairs; ``None`` -> no auth.

    A blank spec, a blank item (``"u:p,"``), or a user or password that is empty or only
    whitespace raises :class:`AuthSpecError`: a typo must not turn auth off. The message
    says which item is wrong but never repeats it (it holds a password).
    """
    if spec is None:
        return None
    if not isinstance(spec, str) or not spec.strip():
        raise AuthSpecError(
            f"--api-auth is blank ({spec!r}); give 'user:password' (several separated by commas), or leave it out to serve without auth"
        )
    items = spec.split(",")
    pairs = []
    for i, item in enumerate(items, 1):
        user, sep, password = item.strip().partition(":")
        where = f"item {i} of {len(items)}" if len(items) > 1 else "it"
        if not sep:
            raise AuthSpecError(f"--api-auth must be 'user:password' (several separated by commas); {where} has no ':'")
        pairs.append((user, password))
    return check_credentials(pairs)


def check_credentials(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``pairs`` if every user and password is a non-blank string; else :class:`AuthSpecError` naming the pair."""
    if not pairs:
        raise AuthSpecError("auth credentials are an empty list; give at least one (user, password) pair, or None for no auth")
    for i, pair in enumerate(pairs, 1):
        where = f"pair {i} of {len(pairs)}" if len(pairs) > 1 else "the credential"
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise AuthSpecError(f"auth credentials must be (user, password) pairs of strings; {where} is not")
        user, password = pair
        for name, value in (("user", user), ("password", password)):
            if not value.strip():
                blank = "empty" if not value else "only whitespace"
                raise AuthSpecError(f"--api-auth: {where} has a {name} that is {blank}; give 'user:password' with both set")
    return [(u, p) for u, p in pairs]


async def _send_json(send: Send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers],
    })
    await send({"type": "http.response.body", "body": data})


class BasicAuth:
    """Answer 401 to any HTTP request without one of ``credentials`` in its ``Authorization`` header."""

    def __init__(self, app: ASGIApp, credentials: list[tuple[str, str]]):
        self.app = app
        self.credentials = [(u.encode(), p.encode()) for u, p in credentials]

    def _ok(self, header: bytes | None) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        if not sep:
            return False
        ok = False
        for u, p in self.credentials:  # no early exit: the time does not tell which user matched
            ok |= secrets.compare_digest(user, u) & secrets.compare_digest(password, p)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization")
        if self._ok(header):
            return await self.app(scope, receive, send)
        body = error_body(scope.get("path", ""), 401, "Unauthorized", "missing or wrong credentials (HTTP Basic auth)")
        await _send_json(send, 401, body, [(b"www-authenticate", b'Basic realm="opensd"')])


class _TooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTPExceptions met while reading a body."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class BodyLimit:
    """Answer 413 to a request whose body is over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        detail = f"the request body is larger than {self.max_bytes} bytes"
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _send_json(send, 400, error_body(path, 400, "BadRequest", "bad Content-Length header"))
            if too_big:
                return await _send_json(send, 413, error_body(path, 413, "PayloadTooLarge", detail))

        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, error_body(path, 413, "PayloadTooLarge", detail))
