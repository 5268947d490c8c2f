"""What one request may ask of the server, checked before it is queued.

Three kinds of bound: the shape of a request (sizes, steps, batch counts), its prompt
(bytes, then tokens: :mod:`opensd.prompts.budget`) and its *work*. Work is counted in
native image-steps: ``width * height / native**2 * effective steps * images``, where
``native`` is the served model's own resolution (``cfg.image_size``: 32 px for the
bundled model, 512 px for SD 1.x), ``images`` is ``batch_size * n_iter`` and img2img's
effective steps are ``int(steps * denoising_strength)`` (at least 1). One budget thus
scales with the model: 512 px at 20 steps is 20 native image-steps for SD 1.x and 5120
for the 32 px model. A refiner's steps (:mod:`opensd.serving.refiner`) count at the
refiner's own native size: the base draws the first ``ceil(steps * switch_at)`` effective
steps, the refiner the rest. ``max_seconds`` bounds the wall time of a running request on top
(see :mod:`opensd.serving.queue`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from opensd.errors import OpenSDError
from opensd.prompts.budget import PromptBudget
from opensd.serving.errors import ApiError


@dataclass(frozen=True)
class Limits:
    """Bounds on a request; anything outside them is answered 4xx before any work is done.

    ``max_images`` bounds ``batch_size * n_iter``; ``max_body_bytes`` the raw request body
    (base64 images included); ``max_input_pixels`` each uploaded image.
    ``max_prompt_bytes`` / ``max_prompt_tokens`` bound the prompt and the negative prompt
    each. ``max_work`` bounds a request's native image-steps (the module doc) and
    ``max_seconds`` its running time. ``workers`` is how many generations run at once
    and ``max_queue`` how many may wait or run in total. ``max_loras`` and ``max_lora_bytes``
    bound the ``<lora:...>`` tags of one request and their files' total size.
    """

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 16
    max_images: int = 64
    max_body_bytes: int = 32 * 2**20
    max_input_pixels: int = 4096 * 4096
    max_prompt_bytes: int = 32 * 1024
    max_prompt_tokens: int = 75 * 20
    max_work: int = 2000
    max_seconds: int = 600
    workers: int = 1
    max_queue: int = 32
    max_loras: int = 16
    max_lora_bytes: int = 4 * 2**30

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OpenSDError(f"Limits.{name} must be a positive integer, got {value!r}")
        if self.max_queue < self.workers:
            raise OpenSDError(f"Limits.max_queue ({self.max_queue}) must be >= workers ({self.workers})")

    @property
    def prompt_budget(self) -> PromptBudget:
        """The budget each prompt (and negative prompt) of a request is checked against."""
        return PromptBudget(max_bytes=self.max_prompt_bytes, max_tokens=self.max_prompt_tokens)

    def check(self, *, width: int, height: int, steps: int, batch_size: int, n_iter: int = 1) -> None:
        """422 naming the first value out of bounds (types were checked by the schema)."""
        _bound("width", width, 1, self.max_width)
        _bound("height", height, 1, self.max_height)
        _bound("steps", steps, 1, self.max_steps)
        _bound("batch_size", batch_size, 1, self.max_batch_size)
        _bound("n_iter", n_iter, 1, self.max_n_iter)
        if batch_size * n_iter > self.max_images:
            raise ApiError(
                422, f"batch_size * n_iter must be at most {self.max_images}, got {batch_size} * {n_iter}", param="n_iter"
            )

    def check_work(
        self, *, native: int, width: int, height: int, steps: int, batch_size: int, n_iter: int = 1, strength: float = 1.0,
        refiner: tuple[int, float] | None = None, hires: tuple[int, int, int] | None = None,
    ) -> float:
        """The request's work in native image-steps (module doc); 422 naming cost and budget when over ``max_work``.

        ``refiner``: (the refiner's native size, refiner_switch_at) when a refiner takes over sampling;
        ``hires``: (width, height, steps) of the hires fix's second pass, counted at its size."""
        effective = steps if strength >= 1.0 else max(1, int(steps * strength))
        images = batch_size * n_iter
        natives = width * height / (native * native)
        if refiner is None:
            work = natives * effective * images
            stages = ""
        else:
            refiner_native, switch_at = refiner
            base_steps, refiner_steps = split_steps(effective, switch_at)
            refiner_natives = width * height / (refiner_native * refiner_native)
            work = (natives * base_steps + refiner_natives * refiner_steps) * images
            stages = (f" ({base_steps} with the model, {refiner_steps} with the refiner at its native "
                      f"{refiner_native}x{refiner_native}: {refiner_natives:g} of its images)")
        if hires is not None:
            hires_natives = hires[0] * hires[1] / (native * native)
            work += hires_natives * hires[2] * images
            stages += f" + the hires fix's {hires[2]} steps at {hires[0]}x{hires[1]} ({hires_natives:g} images)"
        if work > self.max_work:
            step_text = f"{effective} steps" if effective == steps else f"{effective} effective steps ({steps} x strength {strength:g})"
            raise ApiError(
                422,
                f"this request is too much work for this server: {width}x{height} is {natives:g} images of this model's "
                f"native {native}x{native}, x {step_text}{stages} x {images} image(s) = {work:g} native image-steps; the budget "
                f"per request is {self.max_work} (--max-work). Ask for the native size ({native}x{native}), fewer steps "
                f"or fewer images{' (or a smaller hires fix: hr_scale, hr_resize_x/y, hr_second_pass_steps)' if hires else ''}",
                kind="WorkBudgetExceeded", param="width",
            )
        return work


def split_steps(steps: int, switch_at: float) -> tuple[int, int]:
    """(base steps, refiner steps) of ``steps`` sampling steps: the refiner takes over at the first step
    ``i`` (0-based) with ``i / steps >= switch_at``, as A1111 switches."""
    base = min(steps, math.ceil(steps * switch_at - 1e-9))  # 10 * 0.7 is 7.000000000000001 in floats
    return base, steps - base


def _bound(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ApiError(422, f"{name} must be from {low} to {high} on this server, got {value}", param=name)
