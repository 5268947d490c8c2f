"""Stateless samplers on k-diffusion latents ``x = x0 + sigma eps``.

Every sampler has one signature::

    sample_x(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None, **options) -> x

* ``denoiser(x, sigma, **extra_args) -> x0``: e.g. :class:`~opensd.diffusion.denoisers.Denoiser`;
  ``sigma`` is passed as a (B,) float32 tensor.
* ``x``: the start latent at ``sigmas[0]``; for text-to-image ``noise * sqrt(sigmas[0]**2 + 1)``,
  for img2img ``init + noise * sigmas[0]``.
* ``sigmas``: 1-D, non-increasing, > 0 except possibly the last entry
  (:meth:`DiscreteSchedule.sigmas_for`). ``len(sigmas) - 1`` steps are taken. A repeated
  level (``sigmas[i + 1] == sigmas[i]``, e.g. DDIM's last step when its grid reaches
  timestep 0) is a step of length zero: it leaves ``x`` as it is, and the multistep
  samplers keep their history of distinct levels across it.
* Result: the latent in k-diffusion space at ``sigmas[-1]``. When ``sigmas[-1] > 0``
  (DDIM with ``set_alpha_to_one=False`` ends at ``alphas_cumprod[0]``) the VP latent
  the decoder expects is ``to_vp(x, sigmas[-1])`` (division by ``sqrt(1 + sigma^2)``).
* ``callback({"i", "x", "sigma", "denoised"})`` runs once per step after the first
  network call of the step. To stop, it returns ``False`` or :class:`Interrupted` (an
  instance or the class) or raises one; the sampler then raises :class:`Interrupted`
  carrying the step and the latest latent (:mod:`opensd.diffusion.interruption`).
* Random numbers: ``torch.randn(shape, generator=generator, device=generator.device,
  dtype=float32).to(x)`` (CPU and the global RNG without a generator), so one seed
  gives the same noise on CPU and GPU.

No state is kept between calls; samplers are safe to run concurrently with one
denoiser. Formulas follow k-diffusion (Crowson) and, for parity, diffusers'
schedulers: Euler/Heun (Karras et al. 2022, alg. 1-2), DDIM (Song et al. 2021), DDPM
(Ho et al. 2020) as DDIM with eta = 1, DPM2 (Karras et al. 2022), LMS, DPM-Solver++
2M / 2S (Lu et al. 2022), DPM++ SDE, UniPC (Zhao et al. 2023, B(h) variants).

The samplers live by family: :mod:`~opensd.diffusion.samplers_euler` (Euler, Euler
ancestral, DDIM, DDPM, Heun, DPM2), :mod:`~opensd.diffusion.samplers_dpmpp` (DPM++ 2M,
2S ancestral, SDE), :mod:`~opensd.diffusion.samplers_multistep` (LMS, UniPC); what they
share is :mod:`~opensd.diffusion.sampler_base`'s. This module names them all.
"""

from opensd.diffusion.interruption import Interrupted
from opensd.diffusion.protocols import DenoiserFn, SamplerFn
from opensd.diffusion.protocols import SamplerCallback as Callback
from opensd.diffusion.sampler_base import SamplerError
from opensd.diffusion.samplers_dpmpp import sample_dpmpp_2m, sample_dpmpp_2s_ancestral, sample_dpmpp_sde
from opensd.diffusion.samplers_euler import (
    sample_ddim,
    sample_ddpm,
    sample_dpm2,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from opensd.diffusion.samplers_multistep import sample_lms, sample_unipc

__all__ = [
    "Callback",
    "DenoiserFn",
    "Interrupted",
    "SamplerError",
    "SamplerFn",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpm2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "sample_unipc",
]
