"""What a generation run takes besides its request, and what it hands back.

A per-step callback gets a :class:`StepInfo` (return ``False`` from it to stop early);
``should_stop()`` is polled between the stages outside sampling (:func:`check_stop`);
the run returns a :class:`GenerationResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from opensd.diffusion import Interrupted


@dataclass
class StepInfo:
    """What a per-step callback sees. Return ``False`` from the callback to stop early."""

    step: int  # 1-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor  # (B, C, h, w), k-diffusion space
    denoised: torch.Tensor  # (B, C, h, w), the current prediction of the clean latent


StepCallback = Callable[[StepInfo], Any]
StopCheck = Callable[[], bool]


def check_stop(should_stop: StopCheck | None, where: str) -> None:
    """Raise :class:`Interrupted` when ``should_stop()`` says so (outside sampling there is no partial image)."""
    if should_stop is not None and should_stop():
        raise Interrupted(f"stopped while {where}")


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
