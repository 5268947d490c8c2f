"""A1111's textual-inversion routes: ``GET /sdapi/v1/embeddings`` and ``POST /sdapi/v1/refresh-embeddings``.

The server's embeddings folder (``opensd serve --embeddings-dir``,
:class:`~opensd.pipelines.embedding_library.EmbeddingLibrary`) is listed for the current
model: ``loaded`` are those that fit it, ``skipped`` those that do not (or cannot be
read: their ``error`` says why). A txt2img, img2img or OpenAI request uses an embedding
by naming it in its prompt or negative prompt (:func:`request_networks`, at planning).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int | None = None
    vectors: int | None = None
    error: str | None = None


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


def request_networks(st: ServerState, pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str) -> RequestNetworks | None:
    """The embeddings a request's prompts name (None without an embeddings folder); a 422
    naming the file when one cannot be read or does not fit ``pipe``'s model."""
    if st.embeddings is None:
        return None
    return st.embeddings.networks_for_prompts(pipe.model, prompt, negative_prompt)


@router.get("/embeddings", response_model=EmbeddingsResponse, response_model_exclude_unset=True,
            summary="Textual-inversion embeddings: those that fit the current model, and those skipped")
def embeddings(request: Request) -> dict[str, Any]:
    st = server_state(request)
    if st.embeddings is None:
        return {"loaded": {}, "skipped": {}}
    _, pipe = st.registry.current_pair()
    return st.embeddings.listing(pipe.model)


@router.post("/refresh-embeddings", summary="Read the embeddings folder's files again")
def refresh_embeddings(request: Request) -> None:
    st = server_state(request)
    if st.embeddings is not None:
        st.embeddings.refresh()
    return None
