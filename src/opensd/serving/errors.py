"""Every error the server sends is JSON with the same shape.

A1111's API answers errors as ``{"error": <kind>, "detail": <message>, "body": ..., "errors": ...}``
(its ``api_error`` handler); we send ``{"error": <kind>, "detail": <message>, "errors": ...}``,
with ``errors`` holding the field-level list for validation errors. Under ``/v1/`` (the
OpenAI-compatible routes) ``error`` is OpenAI's object ``{"message", "type", "param",
"code"}`` and invalid parameters are 400 (not 422), so that the official client raises a
readable ``BadRequestError``; ``detail`` is still the message.

Every :class:`~opensd.errors.OpenSDError` (bad input, a bad file) is a 4xx: its ``status``,
its ``kind`` and its message. Any other exception is a bug: the answer is 500 with a
``request_id`` that the server's log repeats beside the traceback, and nothing of the
exception's text leaks to the client.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from opensd.errors import OpenSDError

log = logging.getLogger("opensd.serving")


class ApiError(OpenSDError):
    """An error answered as ``status`` with ``{"error": kind, "detail": detail}``."""

    def __init__(
        self, status: int, detail: str, *, kind: str | None = None, param: str | None = None, headers: dict | None = None,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _KINDS.get(status, "Error")
        self.param = param
        self.headers = headers  # extra response headers, e.g. Retry-After on a 429


_KINDS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    422: "ValidationError",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

_OPENAI_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}


def error_body(
    path: str, status: int, kind: str, detail: str, *, errors: Any = None, param: str | None = None, request_id: str | None = None,
) -> dict:
    """The JSON body of an error for a request to ``path``."""
    if path.startswith("/v1/"):
        err: Any = {
            "message": detail,
            "type": _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": kind,
        }
    else:
        err = kind
    body = {"error": err, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(path: str, status: int, kind: str, detail: str, **kw: Any) -> JSONResponse:
    if status == 422 and path.startswith("/v1/"):
        status = 400  # OpenAI answers every invalid parameter with 400
    headers = {"WWW-Authenticate": 'Basic realm="opensd"'} if status == 401 else None
    return JSONResponse(error_body(path, status, kind, detail, **kw), status_code=status, headers=headers)


def _describe_validation(errors: list[dict]) -> tuple[str, list[dict], str | None]:
    """One readable line per pydantic error: ``steps: Input should be a valid integer (got 'abc')``."""
    lines, clean = [], []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        msg = e.get("msg", "invalid")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r:.60})"
        lines.append(f"{where}: {msg}{shown}")
        clean.append({"loc": loc, "msg": msg, "type": e.get("type", "")})
    first = clean[0]["loc"][-1] if clean and clean[0]["loc"] else None
    return "; ".join(lines), clean, first


def install_handlers(app: FastAPI) -> None:
    """Map every exception a route can raise to the JSON error shape above."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        response = error_response(request.url.path, e.status, e.kind, e.detail, param=e.param)
        response.headers.update(e.headers or {})
        return response

    @app.exception_handler(OpenSDError)
    async def _user_error(request: Request, e: OpenSDError) -> JSONResponse:
        return error_response(request.url.path, e.status, e.kind, str(e))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        detail, errors, param = _describe_validation(list(e.errors()))
        return error_response(request.url.path, 422, "ValidationError", detail, errors=errors, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        return error_response(request.url.path, e.status_code, _KINDS.get(e.status_code, "HTTPException"), detail)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.error("unexpected error on %s %s (request id %s)", request.method, request.url.path, rid, exc_info=e)
        detail = f"internal error (request id {rid}); the server log has the details"
        return error_response(request.url.path, 500, "InternalServerError", detail, request_id=rid)
