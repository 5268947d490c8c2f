"""What the routes share: the models, the queue, the limits and the settable options."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from opensd.pipelines.controlnet_library import ControlNetLibrary
from opensd.pipelines.lora_library import LoraLibrary
from opensd.pipelines.upscalers import UpscalerLibrary
from opensd.serving.limits import Limits
from opensd.serving.models import ModelRegistry
from opensd.serving.queue import GenerationQueue
from opensd.serving.segmenters import SegmenterCache


@dataclass
class ServerState:
    registry: ModelRegistry
    queue: GenerationQueue
    limits: Limits
    # Options a client may set with POST /sdapi/v1/options (A1111 names).
    # show_progress_type: "TAESD" (the model's tiny autoencoder, the VAE where it has none),
    # "Full" (the VAE) or "Approx cheap" (a fitted linear latent-to-RGB map: instant, but on the
    # default model's VAE no better than a flat colour, docs/server.md); live_previews_image_format:
    # png, jpeg or webp. sd_vae_decode_method: the final decode, "Full" or "TAESD" (as previews).
    options: dict[str, Any] = field(default_factory=lambda: {
        "CLIP_stop_at_last_layers": 1, "live_previews_enable": True, "show_progress_type": "TAESD",
        "live_previews_image_format": "png", "sd_vae_decode_method": "Full",
    })
    options_lock: threading.Lock = field(default_factory=threading.Lock)
    # The LoRA folder (--lora-dir) that prompt tags name; None: an empty one (every tag is a 422).
    loras: LoraLibrary = field(default_factory=lambda: LoraLibrary(None))
    embeddings: Any = None  # an EmbeddingLibrary (opensd serve --embeddings-dir), or None
    # The upscaler folder (--upscaler-dir): the hires fix's and the Extras routes' model files, by name only.
    upscalers: UpscalerLibrary = field(default_factory=lambda: UpscalerLibrary(None))
    # The ControlNet folder (--controlnet-dir) that alwayson_scripts.controlnet units name.
    controlnets: ControlNetLibrary = field(default_factory=lambda: ControlNetLibrary(None))
    # The model folders' segmenters that explain requests use (segmenter "auto"), each loaded once.
    segmenters: SegmenterCache = field(default_factory=SegmenterCache)


def server_state(request: Request) -> ServerState:
    return request.app.state.opensd
