"""LoRAs over A1111's API: ``GET /sdapi/v1/loras``, ``POST /sdapi/v1/refresh-loras``, and
the ``<lora:name:weight>`` tags of a generation request's prompt.

The server's LoRA folder (``opensd serve --lora-dir``) is one
:class:`~opensd.pipelines.lora_library.LoraLibrary`, shared by every request; what a
request asks for is bound into its own adapter set (:func:`request_networks`), which
only its own run sees. A tag naming no file of the folder, a tag of another kind
(``<hypernet:...>``), a file that does not fit the model, or a request over the LoRA
budget (:attr:`Limits.max_loras`, :attr:`Limits.max_lora_bytes`) is a 422 naming it,
before the request is queued.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from opensd.pipelines.lora_library import LoraBudget
from opensd.pipelines.networks import RequestNetworks
from opensd.pipelines.request import GenerationRequest
from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
from opensd.serving.state import ServerState, server_state

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])


class LoraItem(BaseModel):
    """A1111's ``/sdapi/v1/loras`` item."""

    name: str = Field(description="The file's name without its suffix: what <lora:name:weight> names.")
    alias: str = Field(description="The kohya metadata's ss_output_name (the name when it has none); a tag may name it too.")
    path: str
    metadata: dict[str, Any] | None = Field(None, description="The safetensors metadata (ss_* training keys), JSON objects parsed.")


def lora_budget(st: ServerState) -> LoraBudget:
    """What one request may load on this server (``--max-loras``, ``--max-lora-mb``)."""
    return LoraBudget(max_count=st.limits.max_loras, max_bytes=st.limits.max_lora_bytes)


def request_networks(st: ServerState, pipe: StableDiffusionPipeline, req: GenerationRequest) -> RequestNetworks:
    """The LoRAs that ``req``'s prompt tags name, bound on ``pipe``'s model (a 422 for any problem)."""
    return st.loras.networks_for(pipe.model, req, budget=lora_budget(st))


@router.get("/loras", response_model=list[LoraItem], summary="LoRAs of the server's LoRA folder (--lora-dir)")
def loras(request: Request) -> list[dict]:
    return [e.describe() for e in server_state(request).loras.entries()]


@router.post("/refresh-loras", summary="Rescan the LoRA folder")
def refresh_loras(request: Request) -> None:
    server_state(request).loras.refresh()
    return None  # A1111 answers null
