"""The OpenAPI schema is true to the server's answers, and every bad field is named.

Schemathesis reads ``/openapi.json`` from an in-process app (ASGI transport, a tiny random
32 px model, limits so small that a generation costs milliseconds) and sends every
operation schema-generated requests, valid ones and invalid ones. Each answer must pass
``not_a_server_error`` (no 5xx), status-code conformance (the status is documented),
content-type conformance and response-schema conformance (the body matches the
documented model: the error bodies of :mod:`opensd.serving.errors` included). The fast
suite sends a bounded, derandomized number of requests per operation; the slow variant
(``make test-slow``) many more, at random.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from helpers import tiny_word_bundle
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from opensd.checkpoints import LoadedModel
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving import Limits, create_app
from opensd.serving.schemas import Img2ImgRequest, OpenAIImageRequest, PngInfoRequest, Txt2ImgRequest

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
AUTH = ("fuzz", "s3cret")
# Each generating call costs milliseconds: the tiny model's native 32 px, 2 steps, one image.
SMALL = Limits(
    max_width=32, max_height=32, max_steps=2, max_batch_size=1, max_n_iter=1, max_images=1,
    max_body_bytes=256 * 1024, max_input_pixels=64 * 64, workers=1, max_queue=4,
)


pytestmark = pytest.mark.usefixtures("one_thread_loopback")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    model, tok = tiny_word_bundle()
    return StableDiffusionPipeline(LoadedModel(model=model, tokenizer=tok, path=Path("tiny"), format="opensd", name="tiny", hash="0" * 10))


def _schema(app, **kw):
    return schemathesis.openapi.from_asgi("/openapi.json", app, **kw)


def _fuzz_operation(op, mode, counts: collections.Counter, *, max_examples: int, derandomize: bool, headers: dict | None) -> None:
    """Send ``op`` ``max_examples`` requests of ``mode``; count them in ``counts`` by (operation, status)."""

    @settings(
        max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
        suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call_and_validate(checks=CHECKS, headers=headers)
        counts[(op.label, response.status_code)] += 1

    run()


def fuzz(schema, *, max_examples: int, derandomize: bool, headers: dict | None = None) -> collections.Counter:
    """Send ``max_examples`` requests per operation and generation mode; count them by (operation, status)."""
    counts: collections.Counter = collections.Counter()
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz_operation(op, mode, counts, max_examples=max_examples, derandomize=derandomize, headers=headers)
            except Unsatisfiable:  # no invalid request exists for an operation without parameters
                assert mode is GenerationMode.NEGATIVE and not op.body and not op.query, op.label
            except (Exception, ExceptionGroup) as e:  # every operation runs; the failures are reported together
                failures.append(f"{op.label} ({mode.value}): {type(e).__name__}: {str(e)[:2000]}")
    print(f"\nschemathesis: {sum(counts.values())} requests, {len(failures)} failing operations", file=sys.stderr)
    assert not failures, "\n\n".join(failures)
    return counts


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(pipe) -> None:
    counts = fuzz(_schema(create_app(pipe, limits=SMALL)), max_examples=12, derandomize=True)
    operations = {label for label, _ in counts}
    # every operation was sent requests (16 + LoRA and embedding listings and refreshes + upscalers, latent modes, two
    # Extras routes, and ControlNet's model_list, module_list and version)
    assert len(operations) == 27, operations
    statuses = collections.Counter(status for _, status in counts.elements())
    assert statuses[200] > 0 and statuses[422] > 0 and statuses[400] > 0, statuses  # accepted and refused requests


def test_schemathesis_with_auth_on(pipe) -> None:
    app = create_app(pipe, limits=SMALL, auth=":".join(AUTH))
    schema = _schema(app, auth=AUTH)
    counts = fuzz(schema, max_examples=3, derandomize=True, headers=_basic(*AUTH))
    assert len({label for label, _ in counts}) == 27
    statuses = collections.Counter(status for _, status in counts.elements())
    assert statuses[200] > 0 and statuses[401] > 0, statuses  # with the credentials, and with generated wrong ones


@pytest.mark.slow
def test_schemathesis_many_requests(pipe) -> None:
    """OPENSD_FUZZ_EXAMPLES (default 400) requests per operation and mode, at random; prints the tally."""
    n = int(os.environ.get("OPENSD_FUZZ_EXAMPLES", "400"))
    counts = fuzz(_schema(create_app(pipe, limits=SMALL)), max_examples=n, derandomize=False)
    by_status = collections.Counter()
    for (_, status), k in counts.items():
        by_status[status] += k
    print(f"schemathesis tally by status: {dict(sorted(by_status.items()))}", file=sys.stderr)
    assert not [k for k in counts if k[1] >= 500]


def _basic(user: str, password: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# ---------------------------------------------------------------- the schema's error responses


def _ref(response: dict) -> str:
    return response["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]


@pytest.mark.parametrize("auth", [None, "u:p"])
def test_every_operation_documents_its_errors_with_the_bodies_the_server_sends(pipe, auth) -> None:
    from opensd.serving.openapi import ROUTE_ERRORS

    schema = create_app(pipe, limits=SMALL, auth=auth).openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # FastAPI's 422 body, never sent
    assert {k for k in ROUTE_ERRORS} <= {(m, p) for p, ops in schema["paths"].items() for m in ops}
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            codes = {int(c) for c in op["responses"]}
            where = f"{method} {path}"
            assert 500 in codes, where
            assert (401 in codes) == bool(auth), where
            if "requestBody" in op:
                assert {413, 400 if path.startswith("/v1/") else 422} <= codes, where
            if path.startswith("/v1/"):
                assert 422 not in codes, where  # answered 400 there
            assert codes >= set(ROUTE_ERRORS.get((method, path), ())) - {422}, where
            for code in codes - {200}:
                want = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"
                assert _ref(op["responses"][str(code)]) == want, (where, code)
    assert ("securitySchemes" in schema["components"]) == bool(auth)


def test_real_error_bodies_match_the_documented_models(pipe, monkeypatch) -> None:
    from opensd.serving import a1111, openai_api
    from opensd.serving.errors import ErrorBody, OpenAIErrorBody

    app = create_app(pipe, limits=SMALL)
    c = TestClient(app, raise_server_exceptions=False)
    answers = [
        c.post("/sdapi/v1/txt2img", json={"steps": "many"}),  # 422 with field errors
        c.post("/sdapi/v1/txt2img", json={"sampler_name": "no such sampler"}),  # 404
        c.post("/sdapi/v1/png-info", json={"image": "not base64!"}),  # 400
        c.post("/sdapi/v1/txt2img", json={"prompt": "x" * (SMALL.max_body_bytes + 1)}),  # 413
        c.post("/v1/images/generations", json={"n": "x"}),  # 400 with field errors
        c.post("/v1/images/generations", json={"prompt": "a", "size": "big"}),  # 400 with a param
        c.get("/v1/no-such-route"),
        c.get("/sdapi/v1/txt2img"),  # 405
    ]
    monkeypatch.setattr(a1111, "plan_generation", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(openai_api, "_plan", lambda *a, **k: 1 / 0)
    answers.append(c.post("/sdapi/v1/txt2img", json={}))  # a bug: 500 with a request id
    answers.append(c.post("/v1/images/generations", json={"prompt": "a"}))
    statuses = [r.status_code for r in answers]
    assert statuses == [422, 404, 400, 413, 400, 400, 404, 405, 500, 500]
    for r in answers:
        model = OpenAIErrorBody if r.request.url.path.startswith("/v1/") else ErrorBody
        model.model_validate(r.json())  # extra="forbid": no key outside the schema either
        assert r.headers["content-type"] == "application/json"
    assert answers[5].json()["error"]["param"] == "size" and answers[8].json()["request_id"]


def test_405_says_which_methods_the_path_allows_in_the_json_error_shape(pipe) -> None:
    c = TestClient(create_app(pipe, limits=SMALL))
    for method, path, allow in [
        ("GET", "/sdapi/v1/txt2img", "POST"),
        ("DELETE", "/sdapi/v1/options", "GET, POST"),  # two routes at one path: both named
        ("POST", "/sdapi/v1/progress", "GET"),
        ("PUT", "/", "GET"),
        ("POST", "/static/app.js", "GET, HEAD"),
        ("DELETE", "/v1/images/generations", "POST"),
    ]:
        r = c.request(method, path)
        assert r.status_code == 405 and r.headers.get("allow") == allow, (method, path, r.headers.get("allow"))
        body = r.json()
        if path.startswith("/v1/"):
            assert body["error"]["code"] == "MethodNotAllowed" and body["error"]["type"] == "invalid_request_error"
        else:
            assert body == {"error": "MethodNotAllowed", "detail": "Method Not Allowed"}
    r = c.get("/static/no-such-file.js")
    assert r.status_code == 404 and r.json() == {"error": "NotFound", "detail": "Not Found"}


def test_a_body_that_is_not_utf8_or_not_json_is_a_422_naming_the_body(pipe) -> None:
    c = TestClient(create_app(pipe, limits=SMALL))
    json_type = {"content-type": "application/json"}
    r = c.post("/sdapi/v1/txt2img", content=b'{"prompt": "\xff\xfe"}', headers=json_type)
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON: it is not UTF-8"), r.text
    r = c.post("/v1/images/generations", content=b"\xff", headers=json_type)
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"], r.text
    r = c.post("/sdapi/v1/txt2img", content=b'{"prompt": ', headers=json_type)
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON at character 11"), r.text


# ---------------------------------------------------------------- every field's validation error names it

BAD = [[]]  # no field of any request accepts a list holding a list
BODIES = [
    ("/sdapi/v1/txt2img", Txt2ImgRequest, {}),
    ("/sdapi/v1/img2img", Img2ImgRequest, {}),
    ("/sdapi/v1/png-info", PngInfoRequest, {"image": ""}),
    ("/v1/images/generations", OpenAIImageRequest, {"prompt": "a"}),
]


def _explain_request():
    from opensd.serving.explain_api import ExplainRequest

    return ExplainRequest


@pytest.mark.parametrize("path,model,base", BODIES + [("/opensd/v1/explain", None, {})], ids=lambda v: v if isinstance(v, str) else "")
def test_a_bad_value_in_any_field_is_refused_naming_the_field(pipe, path, model, base) -> None:
    model = model or _explain_request()
    c = TestClient(create_app(pipe, limits=SMALL))
    openai = path.startswith("/v1/")
    for field in model.model_fields:
        r = c.post(path, json={**base, field: BAD})
        assert r.status_code == (400 if openai else 422), (path, field, r.text)
        body = r.json()
        assert body["errors"][0]["loc"][0] == field and body["detail"].startswith(f"{field}"), (path, field, body)
        if openai:
            assert body["error"]["param"] == field, body
    r = c.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"})
    if path == BODIES[0][0]:
        assert r.status_code == 422 and r.json()["detail"].startswith("query.skip_current_image: "), r.text


def test_line_wrapped_base64_images_are_read_and_bad_ones_name_their_field() -> None:
    import base64
    import io

    from PIL import Image

    from opensd.serving.codec import decode_image
    from opensd.serving.errors import ApiError

    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 10, 10)).save(buf, format="PNG")
    wrapped = base64.encodebytes(buf.getvalue()).decode()  # a newline every 76 characters
    assert "\n" in wrapped.strip()
    assert decode_image(wrapped, "init_images[0]", max_pixels=64 * 64).size == (40, 24)
    assert decode_image("data:image/png;base64,\n" + wrapped, "mask", max_pixels=64 * 64).size == (40, 24)
    for bad, status in [("not base64!", 400), (wrapped[:40], 400), ("https://x/y.png", 400)]:
        with pytest.raises(ApiError) as e:
            decode_image(bad, "init_images[0]", max_pixels=64 * 64)
        assert e.value.status == status and e.value.param == "init_images[0]" and "init_images[0]" in e.value.detail
    with pytest.raises(ApiError) as e:
        decode_image(wrapped, "mask", max_pixels=100)
    assert e.value.status == 413 and "40x24" in e.value.detail
