"""txt2img, img2img and inpainting with any loaded Stable Diffusion model.

The loop (Rombach et al. 2022; Ho & Salimans 2022 for guidance): encode the prompt and
the negative prompt once; draw the initial noise on the CPU from the seed (so a seed
gives the same image on any device, as A1111 does); run a sampler on the denoiser
``U-Net -> classifier-free guidance -> eps/v parameterization``; decode the latent.

img2img starts the same loop part-way, from the encoded image plus noise at the sigma
that ``strength`` selects. Inpainting with an ordinary model re-imposes the re-noised
original outside the mask before every network call and in every prediction; a
9-channel inpainting U-Net also gets the mask and the masked image's latent. The mask's
blur, its latent cells and what the masked part starts from ("masked content") are
:mod:`opensd.pipelines.inpaint`'s. The decoded result is pasted over the original
through the (blurred) mask, so pixels outside its reach stay exact.

With a refiner (``refiner=`` another pipeline), the base model runs the first part of
the steps and the refiner the rest, on the same latent and sigmas
(:mod:`opensd.pipelines.refiner`, A1111's "Refiner switch at").

Precision (:mod:`opensd.precision`): the networks run in the model's dtype (``precision``
"auto" picks bfloat16 where it is native and measured faster, else float32); the noise,
the sampler's arithmetic, guidance and the latents between steps stay float32, cast at
each network's boundary, so a seed gives the same image layout in every precision.
Stable Diffusion's VAE overflows float16, so a float16 pipeline runs its VAE in float32
on a kept copy (:mod:`opensd.pipelines.vae_codec`); bfloat16 has float32's range and
decodes as it is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from PIL import Image

from opensd.checkpoints import LoadedModel, load_model
from opensd.conv_kernels import Probe
from opensd.diffusion import DiscreteSchedule
from opensd.diffusion.protocols import ModelFn
from opensd.kernels import Kernels, ModelKernels
from opensd.models.adapters import use_adapters
from opensd.models.unet import UNetModel
from opensd.models.vae import DiagonalGaussian
from opensd.pipelines.compiled import CompiledUNet
from opensd.pipelines.conditioning import Conditioner
from opensd.pipelines.control import ControlRun, ControlUnit, cropped_control, with_control
from opensd.pipelines.decoders import Decoder, decode_tiny, require_tiny, resolve_tiny
from opensd.pipelines.generation import GenerationResult, StepCallback, StepInfo, StopCheck, generation_warnings
from opensd.pipelines.images import ImageInput, load_image, to_pil
from opensd.pipelines.infotext import image_infotext
from opensd.pipelines.inpaint import (
    DEFAULT_MASK_BLUR,
    DEFAULT_MASKED_CONTENT,
    DEFAULT_ONLY_MASKED_PADDING,
    InpaintMask,
    MaskedContent,
    inpaint_only_masked,
)
from opensd.pipelines.networks import NO_NETWORKS, RequestNetworks
from opensd.pipelines.pipeline_steps import PipelineSteps
from opensd.pipelines.refiner import RefinerPlan, plan_refiner, refiner_label, sample_refined
from opensd.pipelines.request import GenerationRequest, RequestError, request_from_settings
from opensd.pipelines.vae_codec import VAECodec
from opensd.precision import Precision, PrecisionForModel, PrecisionSpec, model_precision
from opensd.prompts.budget import DEFAULT_BUDGET, PromptBudget

__all__ = ["GenerationResult", "StableDiffusionPipeline", "StepInfo"]

M = TypeVar("M", bound=torch.nn.Module)


PROBE_LATENT = 16  # the latent side at which a model's convolution kernels are timed (opensd.conv_kernels)


def unet_probe(unet: UNetModel, latent: int) -> Probe:
    """A guided call of ``unet`` (batch 2, 77 context tokens) on fixed random inputs at a latent of
    ``min(latent, PROBE_LATENT)``: what the kernel selection times (a 16x16 SD 1.5 call takes a few
    tenths of a second on one CPU core, against seconds at its native 64x64)."""
    cfg = unet.cfg
    side = max(1, min(latent, PROBE_LATENT))
    p = next(unet.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(p.device, p.dtype)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(p.device, p.dtype)
    y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels, generator=g).to(p.device, p.dtype)
    t = torch.tensor([500.0, 500.0], device=p.device)

    def run() -> torch.Tensor:
        out: torch.Tensor = unet(x, t, ctx, y)
        return out

    return Probe(run, f"the U-Net at a {side}x{side} latent, batch 2")


class StableDiffusionPipeline(PipelineSteps):
    """A loaded model ready to generate. Stateless between calls: safe to share.

    The steps of a generation (noise, denoiser, sampling, decoding) are
    :class:`~opensd.pipelines.pipeline_steps.PipelineSteps`'.

    >>> pipe = opensd.load("path/to/model")
    >>> pipe.txt2img("a red circle above a blue square", seed=1)[0].save("out.png")
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        prompt_budget: PromptBudget | None = DEFAULT_BUDGET,
        vae_upcast: bool | None = None,
        kernels: Kernels | str | None = None,
        compile: bool = False,
        precision: PrecisionSpec = None,
        tiny_vae: Any = None,
    ):
        """The pipeline leaves ``loaded``'s model as it is (its training flag, ``requires_grad``,
        device and dtype): it generates under ``torch.inference_mode`` (its encoders and decoders
        under ``torch.no_grad``), and runs on a copy when ``device`` or ``precision`` asks for
        another device or dtype (``self.loaded`` then holds the copy). :meth:`from_path` owns
        the model it loads: it is frozen and put on ``device`` in place.

        ``prompt_budget`` caps every prompt's bytes and tokens before encoding; None: no cap.
        ``vae_upcast``: run a float16 VAE in float32 (a kept copy); None or True: yes, False: never.
        ``kernels``: auto, default, onednn or None (:class:`~opensd.kernels.ModelKernels`).
        ``compile``: the U-Net through ``torch.compile`` where it can (:mod:`opensd.pipelines.compiled`).
        ``precision`` (or ``dtype``): auto, fp32, bf16 or fp16 (:mod:`opensd.precision`); None: as loaded.
        ``tiny_vae``: the tiny autoencoder (TAESD) of ``decoder="tiny"`` and TAESD previews, a
        module or a path; None: the one in the model's folder, if any (:mod:`opensd.pipelines.decoders`)."""
        self.prompt_budget = prompt_budget
        self.precision = model_precision(precision if precision is not None else dtype, device, loaded.model)
        model = _placed(loaded.model, device, self.precision.dtype)
        self.loaded = loaded if model is loaded.model else dataclasses.replace(loaded, model=model)  # the model as it runs here
        self.model = model
        self.tokenizer = loaded.tokenizer
        self.cfg = self.model.cfg
        self.schedule = DiscreteSchedule(self.cfg.schedule)
        self.conditioner = Conditioner(self.model, self.tokenizer, prompt_budget)
        self.codec = VAECodec(self.model, vae_upcast)
        rows = 2 * (self.cfg.image_size // self.cfg.vae.downsample_factor) ** 2  # a guided batch's tokens, native size
        self.kernels = ModelKernels(self.model, kernels, measure_on=self.model.unet, rows=rows,
                                    probe=unet_probe(self.model.unet, self.cfg.image_size // self.cfg.vae.downsample_factor))
        self._unet: ModelFn = CompiledUNet(self.model.unet) if compile else self.model.unet
        tiny = resolve_tiny(tiny_vae, loaded.path, self.cfg.vae)
        self.tiny_vae = None if tiny is None else _placed(tiny, self.model.device, self.model.dtype, owned=tiny is not tiny_vae)

    @classmethod
    def from_path(
        cls, path: str | Path, *, prediction: Any = None, precision: PrecisionSpec = Precision.AUTO, **kw: Any
    ) -> StableDiffusionPipeline:
        """Load the model at ``path``; ``prediction`` ("eps", "v" or None: as the file says,
        see :mod:`opensd.checkpoints.parameterization`) overrides its parameterization.

        ``precision`` (or ``dtype``, its older name): decided for ``device`` and the model's shapes
        once its configuration is read; the weights are read straight into it."""
        dtype = kw.pop("dtype", None)
        decide = PrecisionForModel(precision if dtype is None else dtype, kw.get("device"))
        loaded = load_model(path, prediction=prediction, dtype=decide)
        _placed(loaded.model.eval().requires_grad_(False), kw.get("device"), loaded.model.dtype, owned=True)  # its own model
        pipe = cls(loaded, **kw)
        assert decide.decision is not None  # made as load_model read the weights (weights_dtype)
        pipe.precision = decide.decision
        return pipe

    # ---------------------------------------------------------------- public API

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        cfg_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_embeds: torch.Tensor | None = None,
        refiner: StableDiffusionPipeline | None = None,
        networks: RequestNetworks | None = None,
        control: list[ControlUnit] | None = None,
        **options: Any,
    ) -> list[Image.Image]:
        """Images for ``prompt``; each carries its A1111 infotext in ``image.info["parameters"]``.

        ``prompt_embeds`` / ``negative_embeds`` (1 or B, L, width) replace the encoded texts,
        which then only label the infotext (see :mod:`opensd.prompts.arithmetic`).
        ``refiner``: a second pipeline that finishes the run after ``refiner_switch_at``
        (default 0.8) of it (:mod:`opensd.pipelines.refiner`). ``networks``: this run's
        LoRAs and textual inversions (:meth:`generate`). ``control``: ControlNet units
        (:class:`~opensd.pipelines.control.ControlUnit`), all applied, each with its weight.
        """
        req = self._request(prompt, negative_prompt, steps, sampler, cfg_scale, width, height, seed, batch_size, 1.0, options)
        return self.generate(
            req, latents=latents, callback=callback, prompt_embeds=prompt_embeds, negative_embeds=negative_embeds,
            refiner=refiner, networks=with_control(networks, control),
        ).images

    def img2img(
        self,
        image: ImageInput,
        prompt: str,
        negative_prompt: str = "",
        *,
        strength: float = 0.75,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        cfg_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        callback: StepCallback | None = None,
        refiner: StableDiffusionPipeline | None = None,
        networks: RequestNetworks | None = None,
        control: list[ControlUnit] | None = None,
        **options: Any,
    ) -> list[Image.Image]:
        """Modify ``image`` toward ``prompt``; ``strength`` 0 keeps it, 1 replaces it.
        ``refiner``, ``control``: as in :meth:`txt2img` (the switch counts the steps img2img
        runs; a unit without an image takes ``image``)."""
        image = load_image(image)
        width, height = self._size_for(image, width, height)
        req = self._request(prompt, negative_prompt, steps, sampler, cfg_scale, width, height, seed, batch_size, strength, options)
        return self.generate(req, init_image=image, callback=callback, refiner=refiner, networks=with_control(networks, control)).images

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        negative_prompt: str = "",
        *,
        strength: float = 1.0,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        cfg_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        mask_blur: int = DEFAULT_MASK_BLUR,
        masked_content: MaskedContent | str | int = DEFAULT_MASKED_CONTENT,
        only_masked: bool = False,
        only_masked_padding: int = DEFAULT_ONLY_MASKED_PADDING,
        callback: StepCallback | None = None,
        refiner: StableDiffusionPipeline | None = None,
        networks: RequestNetworks | None = None,
        control: list[ControlUnit] | None = None,
        **options: Any,
    ) -> list[Image.Image]:
        """Repaint the white part of ``mask`` (same size as ``image``) following ``prompt``.

        ``mask_blur``: Gaussian blur of the mask's edge, in pixels (A1111's mask blur).
        ``masked_content``: what the masked part starts from, a :class:`MaskedContent`
        (or its name, or A1111's ``inpainting_fill`` 0..3); see :mod:`opensd.pipelines.inpaint`.
        ``only_masked``: inpaint only the mask's region plus ``only_masked_padding`` pixels,
        cut out and generated at the output size (A1111's "Inpaint area: Only masked").
        ``refiner``, ``control``: as in :meth:`img2img` (only masked: the control images are cropped too).
        """
        image = load_image(image)
        mask = load_image(mask, what="mask")
        if mask.size != image.size:
            raise RequestError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}; they must be the same size")
        content = cast(MaskedContent, masked_content)  # a name or A1111's number too: InpaintMask parses it
        spec = InpaintMask(mask, mask_blur, content, only_masked, only_masked_padding)
        width, height = self._size_for(image, width, height)
        req = self._request(prompt, negative_prompt, steps, sampler, cfg_scale, width, height, seed, batch_size, strength, options)
        return self.generate(req, init_image=image, mask=spec, callback=callback, refiner=refiner,
                             networks=with_control(networks, control)).images

    # ---------------------------------------------------------------- the loop

    def generate(
        self,
        req: GenerationRequest,
        *,
        init_image: Image.Image | None = None,
        mask: InpaintMask | Image.Image | None = None,
        latents: torch.Tensor | None = None,
        callback: StepCallback | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_embeds: torch.Tensor | None = None,
        should_stop: StopCheck | None = None,
        refiner: StableDiffusionPipeline | None = None,
        networks: RequestNetworks | None = None,
        init_latent: torch.Tensor | None = None,
        decode: bool = True,
    ) -> GenerationResult:
        """Run one validated request. ``latents`` (B, C, h, w) replaces the seeded noise.

        ``init_latent`` (B, C, h, w): img2img from this latent instead of an encoded image
        (the hires fix's second pass, :mod:`opensd.pipelines.hires`). ``decode=False``: no
        images, only the final latent (``GenerationResult.latents``, always set).

        ``networks``: the request's LoRAs and textual inversions
        (:mod:`opensd.pipelines.networks`), active for this run only; the refiner runs without them.

        ``refiner``: a pipeline of a model in the same latent space that runs the steps
        after ``req.refiner_switch_at`` (None: 0.8) with its own conditioning
        (:mod:`opensd.pipelines.refiner`); ``prompt_embeds`` cannot go with it.

        ``mask``: an :class:`~opensd.pipelines.inpaint.InpaintMask` (mask, blur, masked
        content), or a bare mask image, inpainted with the defaults of :meth:`inpaint`.

        ``prompt_embeds`` / ``negative_embeds`` (1 or B, L, width) replace the encoded
        prompt / negative prompt (see :mod:`opensd.prompts.arithmetic`); the request's
        texts then only go into the infotext.

        Sampling stops when ``callback`` returns ``False`` (the partial result is decoded
        and flagged ``interrupted``). ``should_stop()`` is polled outside sampling: before
        each prompt chunk is encoded, before the img2img encode and before the final
        decode, and before every VAE tile when tiled; when it answers True, generate
        raises :class:`~opensd.diffusion.Interrupted` (there is no image to return).
        """
        mask = self._check(req, init_image, mask)
        if mask is not None and mask.only_masked:
            assert init_image is not None  # _check: a mask needs an image
            return inpaint_only_masked(
                lambda image, m, box: self.generate(
                    req, init_image=image, mask=m, latents=latents, callback=callback, prompt_embeds=prompt_embeds,
                    negative_embeds=negative_embeds, should_stop=should_stop, refiner=refiner,
                    networks=cropped_control(networks, (req.width, req.height), box),
                ),
                (req.width, req.height), init_image, mask,
            )
        plan = plan_refiner(self, refiner, req, prompt_embeds, negative_embeds)
        for pipe in (self,) if plan is None else (self, plan.pipe):
            pipe.kernels.selection()
        seeds = self._seeds(req.seed, req.batch_size)
        networks = networks or NO_NETWORKS
        control = ControlRun.prepare(self, req, networks.control, init_image)
        with torch.inference_mode():
            with use_adapters(networks.adapters):
                cond, uncond = self.conditioner.for_request(
                    req, prompt_embeds=prompt_embeds, negative_embeds=negative_embeds, should_stop=should_stop,
                    embeddings=networks.embeddings,
                )
            start = self._initial_latents(req, seeds, init_image, mask, latents, should_stop, init_latent)
            if control is not None:  # the ControlNets' step counter, and which rows are conditional
                cond, uncond, callback = control.attach(cond, uncond, callback)
            denoiser = self._denoiser(req, start, control)
            finisher = self
            with use_adapters(networks.adapters):
                if plan is None or not plan.runs:
                    result, interrupted = self._sample(req, denoiser, start, cond, uncond, seeds, callback)
                else:
                    result, interrupted, finisher = sample_refined(self, plan, req, denoiser, start, (cond, uncond), seeds,
                                                                   callback, should_stop)
            images = to_pil(self._decode(req, result, start, should_stop, finisher)) if decode else []
        ran = plan if plan is not None and finisher is not self else None
        warnings = generation_warnings(self, req, prompt_embeds, negative_embeds, networks)
        return self._result(req, seeds, images, result, interrupted, ran, networks, warnings)

    def _result(
        self, req: GenerationRequest, seeds: list[int], images: list[Image.Image], latents: torch.Tensor,
        interrupted: bool, ran: RefinerPlan | None, networks: RequestNetworks, warnings: list[str],
    ) -> GenerationResult:
        """The run's result: each image with its infotext (``ran``: the refiner's plan when it ran)."""
        infotexts = [self.infotext(req, s, refiner=ran, extra=networks.infotext) for s in seeds]
        for im, text in zip(images, infotexts, strict=False):
            im.info["parameters"] = text
        return GenerationResult(images, seeds, infotexts, interrupted, warnings, latents)

    # ---------------------------------------------------------------- pieces

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int = 1, *, should_stop: StopCheck | None = None) -> torch.Tensor:
        """(B, L, D) text context for ``prompts``; ``clip_skip`` 2 uses the penultimate layer (A1111, SD 1.x).

        Prompts use A1111's syntax (``(word:1.3)``, ``[word]``, ``BREAK``) and may be
        longer than the context: L is a whole number of chunks (77 each for CLIP), see
        :mod:`opensd.prompts.syntax`. With ``should_stop``, the chunks are encoded one at
        a time and ``should_stop()`` is checked before each (:class:`Interrupted` when it
        answers True). The family's whole text embedding (with SDXL's pooled one) is
        :meth:`Conditioner.encode <opensd.pipelines.conditioning.Conditioner.encode>`'s.
        """
        return self.conditioner.encode(prompts, clip_skip, should_stop=should_stop).context

    @torch.no_grad()
    def decode_latents(
        self, latents: torch.Tensor, tiled_vae: bool | None = None, *, should_stop: StopCheck | None = None,
        decoder: Decoder | str = Decoder.FULL,
    ) -> torch.Tensor:
        """Diffusion latents (B, C, h, w) -> images (B, 3, h*f, w*f) in about [-1, 1].

        ``decoder="tiny"``: with the pipeline's tiny autoencoder (TAESD), in one piece, float32.

        ``tiled_vae``: decode in overlapping tiles (:mod:`opensd.pipelines.vae_tiling`);
        None decides by size (tiles when a side is over 1.5 times the model's native size,
        at least 96 latent cells: 768 px in SD 1.x, 1536 px in SDXL).
        ``should_stop`` is checked before the decode and before every tile. A float16
        SDXL-family model decodes in float32 (the module docstring) and returns float32.
        """
        if Decoder.parse(decoder) is Decoder.TINY:
            return decode_tiny(require_tiny(self.tiny_vae), latents, should_stop)
        return self.codec.decode(latents, tiled_vae, should_stop)

    @torch.no_grad()
    def encode_pixels(
        self, pixels: torch.Tensor, tiled_vae: bool | None = None, *, should_stop: StopCheck | None = None
    ) -> DiagonalGaussian:
        """Images (B, 3, H, W) in [-1, 1] -> the VAE's posterior over (unscaled) latents.

        ``tiled_vae``: encode in overlapping tiles (:func:`~opensd.pipelines.vae_tiling.encode_tiled`);
        None decides by size, as :meth:`decode_latents` does. ``should_stop`` is checked
        before the encode and before every tile. A float16 SDXL-family model encodes in
        float32; the posterior comes back in the model's dtype.
        """
        return self.codec.encode(pixels, tiled_vae, should_stop)

    def infotext(
        self, req: GenerationRequest, seed: int, *, refiner: RefinerPlan | None = None, extra: Mapping[str, str] | None = None,
    ) -> str:
        """A1111's infotext of one image (:func:`~opensd.pipelines.infotext.image_infotext`)."""
        return image_infotext(req, seed, self.loaded, None if refiner is None else (refiner_label(refiner.pipe), refiner.switch_at),
                              extra)

    def request(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        sampler: str = "dpmpp_2m",
        cfg_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        batch_size: int = 1,
        strength: float = 1.0,
        **options: Any,
    ) -> GenerationRequest:
        """The :class:`GenerationRequest` these settings make for this model (its native size
        where width/height are None); ``options`` are the request's other fields
        (``karras``, ``guidance_rescale``, ``clip_skip``, ``tiled_vae``, SDXL's
        ``original_size``...) and, beyond those, the sampler's options."""
        return self._request(prompt, negative_prompt, steps, sampler, cfg_scale, width, height, seed, batch_size, strength, dict(options))

    def _request(
        self, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, width: int | None,
        height: int | None, seed: int | None, batch_size: int, strength: float, options: dict[str, Any],
    ) -> GenerationRequest:
        return request_from_settings(
            self.cfg.image_size, prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=sampler,
            cfg_scale=cfg_scale, width=width, height=height, seed=seed, batch_size=batch_size, strength=strength,
            options=options,
        )


def _placed(module: M, device: str | torch.device | None, dtype: torch.dtype, *, owned: bool = False) -> M:
    """``module`` on ``device`` (None: where it is) in ``dtype``: itself when it is there already,
    or when ``owned`` moved there in place; else a copy moved there, the caller's module untouched."""
    p = next(module.parameters())
    if (device is None or _same_device(p.device, torch.device(device))) and p.dtype == dtype:
        return module
    return (module if owned else copy.deepcopy(module)).to(device=device, dtype=dtype)


def _same_device(have: torch.device, want: torch.device) -> bool:
    """Whether ``want`` (``cuda`` means the current CUDA device) names ``have``."""
    if have.type != want.type:
        return False
    if want.index is None and want.type == "cuda":
        return have.index == torch.cuda.current_device()
    return want.index is None or have.index == want.index
