"""The sampling and decoding steps of :class:`~opensd.pipelines.stable_diffusion.StableDiffusionPipeline`.

:meth:`StableDiffusionPipeline.generate` runs them in order: check the request
(:meth:`PipelineSteps._check`), draw the noise and encode the image
(:meth:`PipelineSteps._initial_latents`), build the denoiser (ControlNets -> U-Net ->
classifier-free guidance -> eps/v parameterization -> the inpainting mask), sample, decode.
The pipeline's public API (txt2img, img2img, inpaint, the encoders and decoders) is
:mod:`opensd.pipelines.stable_diffusion`'s; the refiner (:mod:`opensd.pipelines.refiner`)
reuses these steps on its second pipeline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from opensd.diffusion import ClassifierFreeGuidance, Denoiser
from opensd.diffusion.interruption import Interrupted, StopCheck, asks_to_stop
from opensd.diffusion.protocols import DenoiserFn, ModelFn, SamplerCallback
from opensd.diffusion.registry import sample
from opensd.models.vae import DiagonalGaussian
from opensd.pipelines.control import ControlRun
from opensd.pipelines.decoders import Decoder, decode_tiny, require_tiny
from opensd.pipelines.generation import StepCallback, StepInfo
from opensd.pipelines.images import to_tensor
from opensd.pipelines.inpaint import InpaintMask, MaskedDenoiser, mask_latents, masked_init_latent
from opensd.pipelines.refiner import guidance_args
from opensd.pipelines.request import SEED_RANGE, GenerationRequest, RequestError, validate
from opensd.prompts.budget import check_prompt

if TYPE_CHECKING:  # the pipeline subclasses these steps
    from opensd.diffusion import DiscreteSchedule
    from opensd.models.stable_diffusion import SDConfig, StableDiffusion
    from opensd.models.taesd import TinyAutoencoder
    from opensd.pipelines.conditioning import Conditioner, Conditioning
    from opensd.pipelines.stable_diffusion import StableDiffusionPipeline
    from opensd.prompts.budget import PromptBudget
    from opensd.tokenizers import Tokenizer


@dataclass
class _Start:
    """Where sampling starts: the noise, and for img2img/inpainting what the image gives."""

    noise: torch.Tensor  # (B, C, h, w) float32, one draw per seed
    init_latent: torch.Tensor | None = None  # (B, C, h, w) the encoded image (masked start for inpainting)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) the init image in [-1, 1]
    pixel_mask: torch.Tensor | None = None  # (1, 1, H, W) the blurred mask
    latent_mask: torch.Tensor | None = None  # (B, 1, h, w)
    concat: torch.Tensor | None = None  # (B, 1 + C, h, w) the 9-channel inpainting U-Net's extra input


class PipelineSteps:
    """The steps of one generation; :class:`StableDiffusionPipeline` holds the model and these
    attributes, set in its ``__init__``."""

    # what StableDiffusionPipeline.__init__ sets
    model: StableDiffusion
    cfg: SDConfig
    tokenizer: Tokenizer
    schedule: DiscreteSchedule
    conditioner: Conditioner
    prompt_budget: PromptBudget | None
    tiny_vae: TinyAutoencoder | None
    _unet: ModelFn

    def encode_pixels(
        self, pixels: torch.Tensor, tiled_vae: bool | None = None, *, should_stop: StopCheck | None = None
    ) -> DiagonalGaussian:
        raise NotImplementedError  # StableDiffusionPipeline.encode_pixels

    def decode_latents(
        self, latents: torch.Tensor, tiled_vae: bool | None = None, *, should_stop: StopCheck | None = None,
        decoder: Decoder | str = Decoder.FULL,
    ) -> torch.Tensor:
        raise NotImplementedError  # StableDiffusionPipeline.decode_latents

    def _check(
        self, req: GenerationRequest, init_image: Image.Image | None, mask: InpaintMask | Image.Image | None,
    ) -> InpaintMask | None:
        """Validate ``req`` for this model before any work; the mask as an :class:`InpaintMask`."""
        validate(req, multiple=8, min_side=max(8, self.cfg.vae.downsample_factor))
        if self.conditioner.clip_skip_applies() and req.clip_skip > self.cfg.text.layers:
            raise RequestError(f"clip_skip must be at most {self.cfg.text.layers} for this model, got {req.clip_skip}")
        self.conditioner.check_clip_skip(req.clip_skip)
        if mask is not None and init_image is None:
            raise RequestError("a mask needs an image to inpaint")
        if req.resolved_decoder() is Decoder.TINY:
            require_tiny(self.tiny_vae)
        if self.prompt_budget is not None:  # before any work; the encoder checks again (for direct calls)
            for name in ("prompt", "negative_prompt"):
                check_prompt(getattr(req, name), self.tokenizer, self.prompt_budget, what=name)
        return InpaintMask(mask) if isinstance(mask, Image.Image) else mask

    def _initial_latents(
        self, req: GenerationRequest, seeds: list[int], init_image: Image.Image | None, mask: InpaintMask | None,
        latents: torch.Tensor | None, should_stop: StopCheck | None, init_latent: torch.Tensor | None = None,
    ) -> _Start:
        """The noise (one draw per seed, on the CPU) and, for img2img/inpainting, the encoded
        image, its mask and the 9-channel inpainting input. The seeds' draws keep A1111's
        order: the posterior draw, then the noise."""
        dev = self.model.device  # float32 throughout; the VAE and the U-Net cast at their inputs
        f = self.cfg.vae.downsample_factor
        shape = (req.batch_size, self.cfg.vae.embed_dim, req.height // f, req.width // f)
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        st = _Start(noise=torch.empty(0))
        if init_latent is not None:  # img2img from a latent: nothing to encode
            if tuple(init_latent.shape) != shape:
                raise RequestError(f"init_latent must have shape {shape}, got {tuple(init_latent.shape)}")
            st.init_latent = init_latent.to(dev, torch.float32)
        elif init_image is not None:
            st.pixels = to_tensor(init_image, req.width, req.height).to(dev)
            posterior = self._posterior(st.pixels, req.tiled_vae, should_stop)
            # One posterior draw per image, from that image's seed (diffusers draws it first too).
            eps = torch.cat([torch.randn(posterior.mean.shape, generator=g) for g in gens]).to(dev)
            st.init_latent = self.model.vae.to_latent(posterior.mean + posterior.std * eps)
            if mask is not None:
                st.pixel_mask, st.latent_mask, st.init_latent, st.concat = mask_latents(
                    mask, st.pixels, eps, st.init_latent, req.batch_size,
                    encode=lambda x: self._posterior(x, req.tiled_vae, should_stop),
                    to_latent=self.model.vae.to_latent,
                    nine_channel=self.cfg.is_inpainting,
                )
        if st.concat is None and self.cfg.is_inpainting:
            # An inpainting U-Net without a mask: all of it masked, the masked image blank (A1111).
            blank = torch.zeros(1, 3, req.height, req.width, device=dev)
            masked = self.model.vae.to_latent(self._posterior(blank, req.tiled_vae, None).mode())
            ones = torch.ones(req.batch_size, 1, *shape[2:], device=dev)
            st.concat = torch.cat([ones, masked.expand(req.batch_size, -1, -1, -1)], dim=1)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise RequestError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            st.noise = latents.to(dev, torch.float32)
        else:
            st.noise = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens]).to(dev)
        if st.latent_mask is not None:  # after the noise: the seeds' draws keep their order
            assert mask is not None and st.init_latent is not None
            st.init_latent = masked_init_latent(mask.content, st.init_latent, st.latent_mask, st.noise)
        return st

    def _denoiser(self, req: GenerationRequest, st: _Start, control: ControlRun | None = None) -> DenoiserFn:
        """(ControlNets ->) U-Net -> classifier-free guidance -> eps/v parameterization (-> the inpainting mask)."""
        spec, spacing = req.resolved_sampler()
        denoiser: DenoiserFn = Denoiser(self._network(st.concat, req, control), self.schedule).with_quantize_t(
            spec.rule.quantize_t(spacing)
        )
        if st.latent_mask is not None and st.concat is None:
            assert st.init_latent is not None
            denoiser = MaskedDenoiser(denoiser, st.init_latent, st.noise, st.latent_mask)
        return denoiser

    def _sample(
        self, req: GenerationRequest, denoiser: DenoiserFn, st: _Start, cond: Conditioning,
        uncond: Conditioning | None, seeds: list[int], callback: StepCallback | None,
    ) -> tuple[torch.Tensor, bool]:
        """``(final latent, interrupted)``; a stopped run returns its last prediction."""
        extra = guidance_args(cond, uncond)
        if req.strength < 1.0 and int(req.steps * req.strength) < 1:  # too weak for a single step: keep the image
            assert st.init_latent is not None
            return st.init_latent, False
        state: dict[str, Any] = {"denoised": None}
        step_cb = self._step_callback(callback, int(req.steps * req.strength) if req.strength < 1 else req.steps, state)
        sampler_gen = self._sampler_generator(seeds)
        try:
            result = sample(
                denoiser, st.noise, self.schedule, req.sampler, req.steps, karras=bool(req.karras),
                generator=sampler_gen, callback=step_cb, strength=req.strength, init_latent=st.init_latent,
                extra_args=extra, **req.sampler_options,
            )
            return result, False
        except Interrupted:
            result = state["denoised"]
            if result is None:
                result = st.init_latent if st.init_latent is not None else st.noise * 0
            return result, True

    def _decode(
        self, req: GenerationRequest, result: torch.Tensor, st: _Start, should_stop: StopCheck | None,
        finisher: StableDiffusionPipeline | None = None,
    ) -> torch.Tensor:
        """The final latent decoded (by ``finisher``'s VAE: the model that ran the last step);
        when inpainting, pasted over the original through the mask."""
        if st.latent_mask is not None and st.concat is None:
            assert st.init_latent is not None
            result = st.latent_mask * result.to(st.init_latent) + (1 - st.latent_mask) * st.init_latent
        last: PipelineSteps = finisher or self
        if req.resolved_decoder() is Decoder.TINY:  # the refiner's tiny autoencoder, else the base's (one latent space)
            decoded = decode_tiny(require_tiny(last.tiny_vae or self.tiny_vae), result, should_stop)
        else:
            decoded = last.decode_latents(result, req.tiled_vae, should_stop=should_stop).float()
        if st.pixel_mask is not None:
            assert st.pixels is not None
            # As A1111 does: outside the mask, the original pixels, exactly.
            decoded = st.pixel_mask * decoded + (1 - st.pixel_mask) * st.pixels.to(decoded)
        return decoded

    def _posterior(self, pixels: torch.Tensor, tiled_vae: bool | None, should_stop: StopCheck | None) -> DiagonalGaussian:
        """:meth:`encode_pixels` with the posterior in float32 (what the loop computes in)."""
        posterior = self.encode_pixels(pixels, tiled_vae, should_stop=should_stop)
        return posterior if posterior.moments.dtype == torch.float32 else DiagonalGaussian(posterior.moments.float())

    def _network(self, concat: torch.Tensor | None, req: GenerationRequest, control: ControlRun | None = None) -> ModelFn:
        """The guided U-Net as the sampler calls it: float32 in and out, the model's dtype inside
        (the timesteps stay float32: the U-Net embeds them in float32; bfloat16 would round 999 to 1000);
        with ``control``, the U-Net takes its ControlNets' residuals."""
        unet = self._unet
        dtype = next(self.model.unet.parameters()).dtype

        def unet_fn(
            x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
            control_rows: torch.Tensor | None = None,
        ) -> torch.Tensor:
            extra = {} if control is None else control.unet_kwargs(x_in, t, context, y, control_rows, dtype)
            if concat is not None:  # (2B or B, 4+1+4, h, w) for 9-channel inpainting U-Nets
                c = concat.repeat(x_in.shape[0] // concat.shape[0], 1, 1, 1)
                x_in = torch.cat([x_in, c.to(x_in)], dim=1)
            out = unet(x_in.to(dtype), t.float(), context.to(dtype), None if y is None else y.to(dtype), **extra)
            return out.to(x_in.dtype)

        return ClassifierFreeGuidance(unet_fn, req.cfg_scale, req.guidance_rescale)

    def _sampler_generator(self, seeds: list[int]) -> torch.Generator:
        """The stochastic samplers' noise, one stream per run from the first seed."""
        return torch.Generator("cpu").manual_seed((seeds[0] + 0x5EED) % SEED_RANGE)

    def _step_callback(self, callback: StepCallback | None, total: int, state: dict[str, Any]) -> SamplerCallback:
        def step_cb(d: dict[str, Any]) -> None:
            state["denoised"] = d["denoised"]
            if callback is not None:
                info = StepInfo(d["i"] + 1, total, float(d["sigma"]), d["x"], d["denoised"])
                if asks_to_stop(callback(info)):
                    raise Interrupted(step=d["i"] + 1)

        return step_cb

    def _seeds(self, seed: int | None, n: int) -> list[int]:
        if seed is None or seed == -1:
            seed = random.randrange(SEED_RANGE)
        return [(seed + i) % SEED_RANGE for i in range(n)]

    def _size_for(self, image: Image.Image, width: int | None, height: int | None) -> tuple[int, int]:
        """Default output size: the image's, rounded down to a multiple of 8."""
        if width is None:
            width = max(8, image.size[0] // 8 * 8)
        if height is None:
            height = max(8, image.size[1] // 8 * 8)
        return width, height
