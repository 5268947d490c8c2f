"""Every error the server sends is JSON with the same shape.

A1111's API answers errors as ``{"error": <kind>, "detail": <message>, "body": ..., "errors": ...}``
(its ``api_error`` handler); we send ``{"error": <kind>, "detail": <message>, "errors": ...}``,
with ``errors`` holding the field-level list for validation errors. Under ``/v1/`` (the
OpenAI-compatible routes) ``error`` is OpenAI's object ``{"message", "type", "param",
"code"}`` and invalid parameters are 400 (not 422), so that the official client raises a
readable ``BadRequestError``; ``detail`` is still the message.

Every :class:`~opensd.errors.OpenSDError` (bad input, a bad file) is a 4xx: its ``status``,
its ``kind`` and its message. A 405 carries ``Allow`` with every method the path answers.
:class:`ErrorBody` and :class:`OpenAIErrorBody` are these bodies as pydantic models: the
OpenAPI schema documents every error response with them (:mod:`opensd.serving.openapi`). Any other exception is a bug: the answer is 500 with a
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
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

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


# ---------------------------------------------------------------- the bodies, as the OpenAPI schema shows them


class FieldError(BaseModel):
    """One field-level problem of a request that failed validation."""

    model_config = ConfigDict(extra="forbid")  # the schema says: no other keys

    loc: list[str] = Field(description="Where: the field's path, e.g. ['steps'] or ['query', 'skip_current_image'].")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'int_parsing' or 'missing'.")


class ErrorBody(BaseModel):
    """An error outside ``/v1/`` (A1111's shape)."""

    model_config = ConfigDict(extra="forbid")  # the schema says: no other keys

    error: str = Field(description="The kind of error: ValidationError, NotFound, QueueFull, CheckpointError, ...")
    detail: str = Field(description="What is wrong and what is allowed.")
    errors: list[FieldError] | None = Field(None, description="Validation errors only: one item per field at fault.")
    request_id: str | None = Field(None, description="500 only: the id the server's log repeats beside the traceback.")


class OpenAIError(BaseModel):
    """OpenAI's error object."""

    model_config = ConfigDict(extra="forbid")  # the schema says: no other keys

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str | None = Field(description="The kind of error, as ``error`` outside /v1/.")


class OpenAIErrorBody(BaseModel):
    """An error under ``/v1/`` (OpenAI's shape, plus ``detail`` as elsewhere)."""

    model_config = ConfigDict(extra="forbid")  # the schema says: no other keys

    error: OpenAIError
    detail: str = Field(description="The message again, as outside /v1/.")
    errors: list[FieldError] | None = Field(None, description="Validation errors only: one item per field at fault.")
    request_id: str | None = Field(None, description="500 only: the id the server's log repeats beside the traceback.")


def body_model(path: str) -> type[BaseModel]:
    """The model of the error bodies answered for ``path``."""
    return OpenAIErrorBody if path.startswith("/v1/") else ErrorBody


def answered_status(path: str, status: int) -> int:
    """The status an error of ``status`` is answered with on ``path`` (OpenAI's routes turn 422 into 400)."""
    return 400 if status == 422 and path.startswith("/v1/") else status


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


def error_response(path: str, status: int, kind: str, detail: str, *, headers: dict | None = None, **kw: Any) -> JSONResponse:
    status = answered_status(path, status)  # OpenAI answers every invalid parameter with 400
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", 'Basic realm="opensd"')
    return JSONResponse(error_body(path, status, kind, detail, **kw), status_code=status, headers=headers or None)


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: each method some route answers at the request's path.

    Routes are asked whether they match the path with each method in turn (FastAPI nests
    included routers, so their method sets are not listed flat); a mount (the static
    files) answers GET and HEAD.
    """
    root = request.scope.get("app_root_path", request.scope.get("root_path", ""))  # inside a mount, the app's
    scope = {"type": "http", "path": request.scope["path"], "root_path": root, "headers": []}
    allowed: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Mount):
            if route.matches({**scope, "method": "GET"})[0] is not Match.NONE:
                allowed |= {"GET", "HEAD"}
            continue
        allowed |= {m for m in _METHODS if route.matches({**scope, "method": m})[0] is Match.FULL}
    return ", ".join(m for m in _METHODS if m in allowed)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _describe_validation(errors: list[dict]) -> tuple[str, list[dict], str | None]:
    """One readable line per pydantic error: ``steps: Input should be a valid integer (got 'abc')``."""
    lines, clean = [], []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        msg = e.get("msg", "invalid")
        got = e.get("input")
        if e.get("type") == "json_invalid":  # loc holds the character position, not a field
            loc, got = [], None
            msg = f"not valid JSON at character {e['loc'][-1]} ({e.get('ctx', {}).get('error', 'decode error')})"
        elif isinstance(got, bytes):
            msg, got = f"{msg}: send a JSON object with Content-Type: application/json", None
        where = ".".join(loc) or "body"
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
        if isinstance(e.__cause__, UnicodeDecodeError):  # FastAPI's 400 for a JSON body that is not UTF-8
            bad = e.__cause__
            detail = f"body: not valid JSON: it is not UTF-8 text (byte {bad.start}: {bad.reason})"
            errors = [{"loc": [], "msg": detail[6:], "type": "json_invalid"}]
            return error_response(request.url.path, 422, "ValidationError", detail, errors=errors)
        detail = e.detail if isinstance(e.detail, str) else str(e.detail)
        headers = {k: v for k, v in (e.headers or {}).items() if k.lower() != "allow"}
        if e.status_code == 405:  # Starlette's Allow names only the first route at the path
            headers["Allow"] = allowed_methods(request)
        return error_response(request.url.path, e.status_code, _KINDS.get(e.status_code, "HTTPException"), detail, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        rid = uuid.uuid4().hex[:12]
        log.error("unexpected error on %s %s (request id %s)", request.method, request.url.path, rid, exc_info=e)
        detail = f"internal error (request id {rid}); the server log has the details"
        return error_response(request.url.path, 500, "InternalServerError", detail, request_id=rid)
