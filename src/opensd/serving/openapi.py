"""The OpenAPI schema, true to what the server answers: every operation lists its errors.

FastAPI documents a route's 200 and, for a route with parameters, a 422 whose body
(``HTTPValidationError``) is not the one this server sends. :func:`install_openapi`
replaces that: each operation lists every error status it can answer, each with the body
model of :mod:`opensd.serving.errors` (:class:`~opensd.serving.errors.ErrorBody`, or
:class:`~opensd.serving.errors.OpenAIErrorBody` under ``/v1/``):

- every operation: 500 (a bug; the body holds a ``request_id``), and 401 when auth is on
  (the schema then also declares HTTP Basic as its security scheme);
- an operation with a body: 413 (the body limit) and 422 (validation); one with query
  parameters: 422;
- under ``/v1/`` a 422 is answered 400 (:func:`~opensd.serving.errors.answered_status`);
- the statuses in :data:`ROUTE_ERRORS`: what a route's own checks raise.

A route added to a router gets the first three by itself; its own statuses go in
:data:`ROUTE_ERRORS` (``tests/test_server_schema.py`` sends schema-generated requests to
every operation and fails on any status the schema does not list).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from opensd.serving.errors import ErrorBody, OpenAIErrorBody, answered_status, body_model

# (method, path) -> the statuses the route's own checks answer, beyond the ones every route gets.
ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    # 404: unknown sampler or model; 409: interrupted before any image; 429: the queue is full;
    # 503: the models folder cannot be read. (A client that went away gets nothing: no 499 here.)
    ("post", "/sdapi/v1/txt2img"): (400, 404, 409, 429, 503),  # 400: a ControlNet unit's image is not an image
    ("post", "/sdapi/v1/img2img"): (400, 404, 409, 429, 503),  # 400: init_images or mask is not an image
    ("post", "/sdapi/v1/png-info"): (400,),
    ("post", "/sdapi/v1/extra-single-image"): (400, 409, 429),  # 400: the image is not one
    ("post", "/sdapi/v1/extra-batch-images"): (400, 409, 429),
    ("post", "/sdapi/v1/options"): (404, 503),
    ("get", "/sdapi/v1/sd-models"): (503,),
    ("post", "/v1/images/generations"): (400, 404, 409, 429, 503),  # 503: the `model` field reads the models folder
    ("post", "/opensd/v1/explain"): (409, 429, 503),
}

DESCRIPTIONS = {
    400: "Bad request: a parameter or an uploaded image is invalid",
    401: "Missing or wrong credentials (HTTP Basic auth)",
    404: "An unknown sampler or model",
    409: "Interrupted: /sdapi/v1/interrupt stopped the request before it had made any image",
    413: "The request body, or an uploaded image, is larger than this server accepts",
    422: "Validation error: the body names each field at fault",
    429: "The generation queue is full; Retry-After says in how many seconds to retry",
    500: "A bug in the server: the body holds the request_id its log repeats beside the traceback",
    503: "The models folder cannot be read",
}

_REF = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, *, auth: bool) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) document the error answers, as above."""
    original = app.openapi
    done = False

    def openapi() -> dict[str, Any]:
        nonlocal done
        schema = original()  # FastAPI's, built once and cached on the app
        if not done:
            document_errors(schema, auth=auth)
            done = True
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_errors(schema: dict[str, Any], *, auth: bool) -> dict[str, Any]:
    """Add the error responses (and, with ``auth``, the Basic security scheme) to ``schema`` in place."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, which this server never sends
        schemas.pop(name, None)
    for model in (ErrorBody, OpenAIErrorBody):
        found = model.model_json_schema(ref_template=_REF)
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status in sorted(error_statuses(method, path, op, auth=auth)):
                responses[str(status)] = _response(path, status)
    if auth:
        components["securitySchemes"] = {"basic": {"type": "http", "scheme": "basic"}}
        schema["security"] = [{"basic": []}]
    return schema


def error_statuses(method: str, path: str, op: dict[str, Any], *, auth: bool) -> set[int]:
    """The error statuses the operation ``method path`` (its OpenAPI object ``op``) can answer."""
    statuses = {500, *ROUTE_ERRORS.get((method, path), ())}
    if auth:
        statuses.add(401)
    if "requestBody" in op:
        statuses |= {413, 422}
    if op.get("parameters"):
        statuses.add(422)
    return {answered_status(path, s) for s in statuses}


def _response(path: str, status: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=body_model(path).__name__)}}},
    }
    if status in _HEADERS:
        name, description, kind = _HEADERS[status]
        out["headers"] = {name: {"description": description, "schema": {"type": kind}}}
    return out


_HEADERS = {
    401: ("WWW-Authenticate", 'Basic realm="opensd"', "string"),
    429: ("Retry-After", "Seconds until a queue slot is likely to be free", "integer"),
}
