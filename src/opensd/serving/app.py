"""The HTTP server: A1111's ``/sdapi/v1``, OpenAI's ``/v1/images/generations`` and a web page.

>>> from opensd.serving import create_app
>>> app = create_app("models/opensd-shapes", auth="me:secret")   # then: uvicorn.run(app)

Routes: ``/sdapi/v1/*`` (see :mod:`opensd.serving.a1111`), ``/v1/images/generations``
(:mod:`opensd.serving.openai_api`), the page at ``/`` (plain HTML/JS/CSS from
``static/``), the OpenAPI schema at ``/openapi.json`` and its viewer at ``/docs``.
Every error is JSON (:mod:`opensd.serving.errors`); every request passes the optional
Basic-auth check and the body-size limit first (:mod:`opensd.serving.security`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import opensd
from opensd.pipelines.controlnet_library import ControlNetLibrary
from opensd.pipelines.embedding_library import EmbeddingLibrary
from opensd.pipelines.lora_library import LoraLibrary
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.pipelines.upscalers import UpscalerLibrary
from opensd.serving import a1111, a1111_options, controlnet_api, embeddings, explain_api, loras, openai_api, upscalers
from opensd.serving.errors import install_handlers
from opensd.serving.limits import Limits
from opensd.serving.models import ModelRegistry
from opensd.serving.openapi import install_openapi
from opensd.serving.queue import GenerationQueue
from opensd.serving.security import BasicAuth, BodyLimit, check_credentials, parse_auth
from opensd.serving.state import ServerState

STATIC = Path(__file__).resolve().parent / "static"


def create_app(
    model: str | Path | StableDiffusionPipeline | None = None,
    *,
    models_dir: str | Path | None = None,
    auth: str | list[tuple[str, str]] | None = None,
    limits: Limits | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    precision: str | torch.dtype | None = None,
    max_loaded: int = 2,
    lora_dir: str | Path | None = None,
    embeddings_dir: str | Path | None = None,
    upscaler_dir: str | Path | None = None,
    controlnet_dir: str | Path | None = None,
) -> FastAPI:
    """A FastAPI app serving ``model`` (a path or a loaded pipeline; default: the first model in ``models_dir``).

    ``models_dir``: a folder whose models ``sd_model_checkpoint`` can switch to.
    ``auth``: ``"user:pass"`` (or ``"u1:p1,u2:p2"``, or a list of pairs) for HTTP Basic auth
    on every route; ``None`` serves without auth. A blank string, or a blank user or
    password, raises :class:`~opensd.errors.OpenSDError` (it never means "no auth"). ``limits``: see :class:`Limits`.
    ``device``/``precision``: where models loaded from a path go and their number format
    (auto, fp32, bf16, fp16: :mod:`opensd.precision`; default auto, decided for each model,
    also for those switched to later; ``dtype`` is an older name for it). ``max_loaded``: how many
    models stay in memory at once (the current one always does). ``lora_dir``: the folder
    that ``<lora:name:weight>`` tags name (:mod:`opensd.serving.loras`); None: no LoRAs.
    ``embeddings_dir``: a folder of textual-inversion embeddings prompts may name
    (:mod:`opensd.serving.embeddings`). ``upscaler_dir``: upscaler models (ESRGAN...) for the hires fix and
    the Extras routes (:mod:`opensd.serving.upscalers`); ``controlnet_dir``: the ControlNets that
    ``alwayson_scripts.controlnet`` units name (:mod:`opensd.serving.controlnet_api`).
    """
    limits = limits or Limits()
    credentials = parse_auth(auth) if isinstance(auth, str) or auth is None else check_credentials(list(auth))
    spec = precision if precision is not None else (dtype if dtype is not None else "auto")
    loader = partial(StableDiffusionPipeline.from_path, device=device, precision=spec)
    registry = ModelRegistry(model, Path(models_dir) if models_dir is not None else None, loader=loader, max_loaded=max_loaded)
    queue = GenerationQueue(limits.workers, limits.max_queue)
    library = EmbeddingLibrary(embeddings_dir) if embeddings_dir is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close()

    app = FastAPI(
        title="opensd",
        version=opensd.__version__,
        description="Stable Diffusion over HTTP: AUTOMATIC1111's `/sdapi/v1` API, OpenAI's Images API, and a web page at `/`.",
        lifespan=lifespan,
    )
    app.state.opensd = ServerState(
        registry, queue, limits, loras=LoraLibrary(lora_dir), embeddings=library,
        upscalers=UpscalerLibrary(upscaler_dir, device=registry.current.model.device),
        controlnets=ControlNetLibrary(controlnet_dir),
    )
    install_handlers(app)
    install_openapi(app, auth=bool(credentials))
    app.include_router(a1111.router)
    app.include_router(a1111_options.router)
    app.include_router(loras.router)
    app.include_router(openai_api.router)
    app.include_router(explain_api.router)
    app.include_router(embeddings.router)
    app.include_router(upscalers.router)
    app.include_router(controlnet_api.router)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Added last = runs first: auth, then the body limit, then the routes.
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if credentials:
        app.add_middleware(BasicAuth, credentials=credentials)
    return app


def describe_state(app: FastAPI) -> dict[str, Any]:
    """What is being served (for logs): the current model, the models folder and the limits."""
    st: ServerState = app.state.opensd
    return {"model": st.registry.current_title(), "models_dir": st.registry.models_dir, "limits": st.limits}
