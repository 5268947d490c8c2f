"""What a generation run takes besides its request, and what it hands back.

A per-step callback gets a :class:`StepInfo` (return ``False`` from it to stop early);
``should_stop()`` is polled between the stages outside sampling (:func:`check_stop`);
the run returns a :class:`GenerationResult`. How a run stops is
:mod:`opensd.diffusion.interruption`'s (``StopCheck`` and ``check_stop`` are re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from opensd.diffusion.interruption import StopCheck, check_stop
from opensd.prompts.extra_networks import lora_tags
from opensd.prompts.vocabulary import prompt_warnings

__all__ = ["GenerationResult", "StepCallback", "StepInfo", "StopCheck", "check_stop", "generation_warnings"]


@dataclass
class StepInfo:
    """What a per-step callback sees. Return ``False`` from the callback to stop early."""

    step: int  # 1-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor  # (B, C, h, w), k-diffusion space
    denoised: torch.Tensor  # (B, C, h, w), the current prediction of the clean latent


StepCallback = Callable[[StepInfo], Any]  # returns False (or Interrupted) to stop: opensd.diffusion.interruption


@dataclass
class GenerationResult:
    """Images plus what produced them (one seed and one infotext per image).

    ``warnings``: what the user should know about the result, e.g. prompt words the
    model does not know and ignored (:func:`opensd.prompts.vocabulary.prompt_warnings`).
    """

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    latents: torch.Tensor | None = None  # (B, C, h, w) the final latent, before decoding


def generation_warnings(pipe: Any, req: Any, prompt_embeds: Any, negative_embeds: Any, networks: Any) -> list[str]:
    """What :class:`GenerationResult.warnings` says of a run of ``req`` on ``pipe`` (a
    :class:`~opensd.pipelines.stable_diffusion.StableDiffusionPipeline`): unknown words,
    a clip skip the family ignores, LoRA tags that no ``networks`` applied."""
    warnings = prompt_warnings(
        pipe.tokenizer,
        req.prompt if prompt_embeds is None else "",
        req.negative_prompt if negative_embeds is None and req.cfg_scale != 1.0 else "",
        embeddings=networks.embeddings,
    )
    if req.clip_skip > 1 and not pipe.conditioner.clip_skip_applies():
        warnings.append(f"clip skip has no effect on {pipe.cfg.family.value} models (their text layer is fixed)")
    if networks.adapters is None:
        names = sorted({t.name for t in lora_tags(req.prompt) + lora_tags(req.negative_prompt) if t.te or t.unet})
        if names:
            warnings.append(f"the prompt names LoRA(s) {', '.join(names)} but none was applied: pass "
                            "networks= (LoraLibrary.networks_for) to apply them")
    return warnings
