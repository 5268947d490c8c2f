"""The denoising path of a generation, and the forward noising of an image.

Denoising (Ho et al. 2020; Karras et al. 2022): at every step the sampler holds the
current latent ``x = x0 + sigma * eps`` and the network's prediction of the clean
latent ``x0`` (the "denoised" estimate). Both are decoded at the chosen steps: the
current latent in the VP form the U-Net sees, ``x / sqrt(sigma^2 + 1)`` (noise fades
out step by step), and the prediction (blurry guesses early, sharp at the end).

Forward noising (the training corruption, Ho et al. 2020 eq. 4): an image is
encoded to its latent ``x0`` (the posterior mean) and mixed with one fixed draw of
noise, ``sqrt(a_t) x0 + sqrt(1 - a_t) eps``, at the noise levels a sampling run of
``steps`` steps visits, from the clean latent up to the largest sigma; each is
decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from opensd.diffusion.schedules import to_vp
from opensd.errors import OpenSDError
from opensd.explain.render import grid, save_gif, upscale, with_label
from opensd.pipelines.images import load_image, to_pil, to_tensor


class PathError(OpenSDError):
    """Bad input to the path functions (steps out of range, bad image)."""


def decode_latents(pipe, latents: torch.Tensor, batch: int = 4) -> list[Image.Image]:
    """(n, C, h, w) VP latents -> n decoded images (``batch`` at a time)."""
    out: list[Image.Image] = []
    with torch.inference_mode():
        for i in range(0, latents.shape[0], batch):  # the pipeline's codec: a float16 VAE decodes in float32
            out += to_pil(pipe.decode_latents(latents[i : i + batch].to(pipe.model.device), tiled_vae=False))
    return out


def _pairs(tops: Sequence[Image.Image], bottoms: Sequence[Image.Image], labels: Sequence[str], panel: int) -> list[Image.Image]:
    """One frame per step: ``top | bottom`` side by side, labelled."""
    frames = []
    for a, b, text in zip(tops, bottoms, labels, strict=False):
        frames.append(with_label(grid([upscale(a, panel), upscale(b, panel)]), text))
    return frames


# ----------------------------------------------------------------------------- denoising

class PathRecorder:
    """A pipeline step callback keeping the current latent and prediction at chosen steps.

    ``at``: 1-based step numbers to keep (None: every step).
    """

    def __init__(self, at: Sequence[int] | None = None) -> None:
        self.at = None if at is None else set(at)
        self.steps: list[int] = []
        self.sigmas: list[float] = []
        self.latents: list[torch.Tensor] = []
        self.denoised: list[torch.Tensor] = []

    def __call__(self, info) -> None:
        if self.at is None or info.step in self.at:
            self.steps.append(info.step)
            self.sigmas.append(info.sigma)
            self.latents.append(to_vp(info.latents[:1].float(), info.sigma).cpu())  # (1, C, h, w)
            self.denoised.append(info.denoised[:1].float().cpu())


@dataclass
class DenoisingPath:
    """What the sampler held at each recorded step, decoded."""

    image: Image.Image  # the final image
    steps: list[int]  # 1-based step numbers
    sigmas: list[float]
    latents: torch.Tensor  # (n, C, h, w): current latents, VP form
    denoised: torch.Tensor  # (n, C, h, w): predicted clean latents
    latent_images: list[Image.Image]
    denoised_images: list[Image.Image]

    def labels(self) -> list[str]:
        return [f"step {s} sigma {sg:.2f}" for s, sg in zip(self.steps, self.sigmas, strict=False)]

    def strip(self, panel: int = 96) -> Image.Image:
        """Two rows, one column per recorded step: the current latent (top), the predicted x0 (bottom)."""
        tops = [with_label(upscale(im, panel), t) for im, t in zip(self.latent_images, self.labels(), strict=False)]
        bottoms = [with_label(upscale(im, panel), "predicted x0") for im in self.denoised_images]
        return grid(tops + bottoms, len(tops))

    def frames(self, panel: int = 128) -> list[Image.Image]:
        """One frame per recorded step: current latent | predicted x0."""
        return _pairs(self.latent_images, self.denoised_images, self.labels(), panel)

    def save_gif(self, path, *, panel: int = 128, duration_ms: int = 250):
        return save_gif(self.frames(panel), path, duration_ms=duration_ms)


def path_from_recorder(pipe, recorder: PathRecorder, image: Image.Image) -> DenoisingPath:
    if not recorder.steps:
        raise PathError("no step was recorded (check `at` against the number of steps)")
    latents = torch.cat(recorder.latents)
    denoised = torch.cat(recorder.denoised)
    return DenoisingPath(
        image, list(recorder.steps), list(recorder.sigmas), latents, denoised,
        decode_latents(pipe, latents), decode_latents(pipe, denoised),
    )


def denoising_path(
    pipe,
    prompt: str,
    *,
    at: Sequence[int] | None = None,
    negative_prompt: str = "",
    seed: int | None = 0,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    cfg_scale: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    clip_skip: int = 1,
) -> DenoisingPath:
    """Generate one image and decode the current latent and the prediction at steps ``at`` (default: all)."""
    if at is not None and (not at or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= steps for s in at)):
        raise PathError(f"at must list step numbers in 1..{steps}, got {at!r}")
    rec = PathRecorder(at)
    req = pipe.request(
        prompt, negative_prompt, steps=steps, sampler=sampler, cfg_scale=cfg_scale, width=width, height=height,
        seed=seed, clip_skip=clip_skip,
    )
    result = pipe.generate(req, callback=rec)
    return path_from_recorder(pipe, rec, result.images[0])


# ----------------------------------------------------------------------------- forward noising

@dataclass
class NoisingPath:
    """An image's latent noised step by step (index 0: clean), decoded."""

    sigmas: list[float]  # increasing, sigmas[0] = 0
    timesteps: list[float]  # continuous training timesteps of the sigmas (0 for the clean latent)
    latents: torch.Tensor  # (n, C, h, w): VP latents sqrt(a) x0 + sqrt(1 - a) eps
    images: list[Image.Image]

    def labels(self) -> list[str]:
        return [f"sigma {s:.2f}" for s in self.sigmas]

    def strip(self, panel: int = 96) -> Image.Image:
        return grid([with_label(upscale(im, panel), t) for im, t in zip(self.images, self.labels(), strict=False)])

    def frames(self, panel: int = 128) -> list[Image.Image]:
        return [with_label(upscale(im, panel), t) for im, t in zip(self.images, self.labels(), strict=False)]

    def save_gif(self, path, *, panel: int = 128, duration_ms: int = 250):
        return save_gif(self.frames(panel), path, duration_ms=duration_ms)


def forward_noising(
    pipe, image, steps: int = 10, *, seed: int = 0, width: int | None = None, height: int | None = None
) -> NoisingPath:
    """``steps + 1`` decoded latents of ``image``: clean, then the sigmas of a ``steps``-step run, smallest first."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= pipe.schedule.num_train_timesteps:
        raise PathError(f"steps must be an integer in 1..{pipe.schedule.num_train_timesteps}, got {steps!r}")
    image = load_image(image)
    width, height = pipe._size_for(image, width, height)
    model = pipe.model
    dev, dtype = model.device, model.dtype
    sigmas = [0.0] + sorted(float(s) for s in pipe.schedule.sigmas_for(steps)[:-1])
    with torch.inference_mode():
        x0 = model.vae.to_latent(pipe.encode_pixels(to_tensor(image, width, height).to(dev, dtype), False).mean.float())
        eps = torch.randn(x0.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(x0.device)
        latents = torch.cat([to_vp(x0 + s * eps, s) for s in sigmas]).cpu()  # (steps + 1, C, h, w)
    timesteps = [0.0] + [float(pipe.schedule.sigma_to_t(s)) for s in sigmas[1:]]
    return NoisingPath(sigmas, timesteps, latents, decode_latents(pipe, latents))


__all__ = [
    "DenoisingPath",
    "NoisingPath",
    "PathError",
    "PathRecorder",
    "decode_latents",
    "denoising_path",
    "forward_noising",
    "path_from_recorder",
]
