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
  network call of the step. To stop, it raises :class:`Interrupted` or returns one
  (an instance or the class); the sampler then raises :class:`Interrupted` carrying
  the step and the latest latent.
* Random numbers: ``torch.randn(shape, generator=generator, device=generator.device,
  dtype=float32).to(x)`` (CPU and the global RNG without a generator), so one seed
  gives the same noise on CPU and GPU.

No state is kept between calls; samplers are safe to run concurrently with one
denoiser. Formulas follow k-diffusion (Crowson) and, for parity, diffusers'
schedulers: Euler/Heun (Karras et al. 2022, alg. 1-2), DDIM (Song et al. 2021), DDPM
(Ho et al. 2020) as DDIM with eta = 1, DPM2 (Karras et al. 2022), LMS, DPM-Solver++
2M / 2S (Lu et al. 2022), DPM++ SDE, UniPC (Zhao et al. 2023, B(h) variants).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from opensd.errors import OpenSDError

Callback = Callable[[dict[str, Any]], Any]
DenoiserFn = Callable[..., torch.Tensor]  # D(x, sigma, **extra_args) -> x0


class SamplerError(OpenSDError):
    """Bad input to a sampler (sigma list, latent, option value)."""


class Interrupted(Exception):
    """Raised (by a callback or by the sampler for it) to stop sampling.

    ``step``: the step index at which sampling stopped; ``x``: the latest latent.
    """

    def __init__(
        self, message: str = "sampling interrupted", *, step: int | None = None, x: torch.Tensor | None = None
    ) -> None:
        super().__init__(message)
        self.step = step
        self.x = x


# ----------------------------------------------------------------------------- helpers


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> list[float]:
    """Check the latent and sigma list; return the sigmas as Python floats."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
        raise SamplerError("x must be a tensor with a batch dimension (B, ...)")
    if not torch.is_floating_point(x):
        raise SamplerError(f"x must be a floating point tensor, got {x.dtype}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 1:
        raise SamplerError("sigmas must be a 1-D tensor with at least one entry")
    s = sigmas.detach().float().cpu().tolist()
    if not all(math.isfinite(v) for v in s):
        raise SamplerError("sigmas must be finite")
    if any(b > a for a, b in zip(s, s[1:])):
        raise SamplerError("sigmas must be non-increasing")
    if any(v <= 0 for v in s[:-1]) or s[-1] < 0:
        raise SamplerError("sigmas must be > 0, except the last which may be 0")
    return s


def _randn(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn in float32 on the generator's device."""
    device = generator.device if generator is not None else "cpu"
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x)


def _denoise(denoiser: DenoiserFn, x: torch.Tensor, sigma: float, extra: dict[str, Any]) -> torch.Tensor:
    s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
    return denoiser(x, s, **extra)


def _report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
    if callback is None:
        return
    try:
        r = callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
    except Interrupted as e:
        e.step, e.x = i, x
        raise
    if r is Interrupted or isinstance(r, Interrupted):
        raise Interrupted(step=i, x=x)


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` splitting a step into a deterministic move to
    ``sigma_down`` and fresh noise of std ``sigma_up`` (``down^2 + up^2 = to^2``); eta = 1
    is the DDPM posterior, eta = 0 is deterministic (DDIM, Song et al. 2021 eq. 16)."""
    if sigma_to == 0.0 or eta == 0.0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _check_nonneg(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise SamplerError(f"{name} must be a number >= 0, got {v!r}")


# ----------------------------------------------------------------------------- first order


def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``
    (Karras et al. 2022, alg. 2 without churn; diffusers EulerDiscreteScheduler)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        x = x + d * (s[i + 1] - s[i])
    return x


def _sample_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callback | None,
    generator: torch.Generator | None,
    eta: float,
    s_noise: float,
) -> torch.Tensor:
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        d = (x - denoised) / s[i]
        x = x + d * (down - s[i])
        if s[i + 1] > 0 and up > 0:
            x = x + _randn(x, generator) * (s_noise * up)
    return x


def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral: an Euler step to ``sigma_down`` plus fresh noise of std ``sigma_up``
    (diffusers EulerAncestralDiscreteScheduler at eta = 1)."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, eta, s_noise)


def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): in k-diffusion space its step is an Euler step
    (eta = 0) or an ancestral step with ``sigma_up = eta * sigma_t / sqrt(a_prev)`` (eta > 0).
    Run on ``DDIM_RULE`` sigmas it equals diffusers' DDIMScheduler; the result is at
    ``sigmas[-1]``, convert with ``to_vp``."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, eta, 1.0)


def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, alg. 2 with the posterior variance
    ``beta~_t``): DDIM with eta = 1, as diffusers' DDPMScheduler (``fixed_small``)."""
    return _sample_ancestral(denoiser, x, sigmas, extra_args, callback, generator, 1.0, 1.0)


# ----------------------------------------------------------------------------- second order


def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, alg. 1); Euler for the last step to sigma 0.
    2 network calls per step (1 for the last). diffusers HeunDiscreteScheduler."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - _denoise(denoiser, x_2, s[i + 1], extra)) / s[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpm2(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver-2 as in k-diffusion: the derivative at the log-midpoint sigma
    ``sqrt(sigma_i sigma_{i+1})`` moves the full step (Karras et al. 2022, sec. 3);
    Euler for the last step. diffusers KDPM2DiscreteScheduler."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        d = (x - denoised) / s[i]
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            s_mid = math.exp(0.5 * (math.log(s[i]) + math.log(s[i + 1])))
            x_2 = x + d * (s_mid - s[i])
            d_2 = (x_2 - _denoise(denoiser, x_2, s_mid, extra)) / s_mid
            x = x + d_2 * (s[i + 1] - s[i])
    return x


def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in ``lambda = -log sigma``: first-order
    start and finish, then a second-order multistep correction from the previous x0.
    diffusers DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    old, h_last = None, None  # x0 and step size of the last step of non-zero length
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == s[i]:
            continue  # a zero-length step
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            if old is None:
                dd = denoised
            else:
                r = h_last / h
                dd = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * dd
            h_last = h
        old = denoised
    return x


def sample_dpmpp_2s_ancestral(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step to ``sigma_down`` (midpoint in lambda), plus ancestral
    noise ``sigma_up`` (k-diffusion ``sample_dpmpp_2s_ancestral``). 2 calls per step."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = denoised
        else:
            h = math.log(s[i] / down)
            s_mid = math.sqrt(s[i] * down)  # lambda midpoint
            x_2 = (s_mid / s[i]) * x - math.expm1(-h / 2) * denoised
            denoised_2 = _denoise(denoiser, x_2, s_mid, extra)
            x = (down / s[i]) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0 and up > 0:
            x = x + _randn(x, generator) * (s_noise * up)
    return x


def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion ``sample_dpmpp_sde``): a stochastic step to the
    lambda-point ``t + r h``, a network call there, then a stochastic full step with the
    mixed x0. The two noises of a step are increments of one Brownian motion in sigma
    (as k-diffusion's Brownian tree: the second contains the first), drawn exactly per
    step from two normals; values differ from torchsde's tree for the same seed."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    _check_nonneg("eta", eta)
    _check_nonneg("s_noise", s_noise)
    if not 0.0 < r <= 1.0:
        raise SamplerError(f"r must be in (0, 1], got {r}")
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        if s[i + 1] == s[i]:
            continue  # a zero-length step: no drift, a zero Brownian increment
        h = math.log(s[i] / s[i + 1])
        s_mid = s[i] * math.exp(-r * h)
        # Brownian increments over [s_mid, s_i] and [s_next, s_i], normalized
        z1, z2 = _randn(x, generator), _randn(x, generator)
        n1 = z1
        n2 = (math.sqrt(s[i] - s_mid) * z1 + math.sqrt(s_mid - s[i + 1]) * z2) / math.sqrt(s[i] - s[i + 1])
        down, up = _ancestral_step(s[i], s_mid, eta)
        x_2 = denoised + (down / s[i]) * (x - denoised) + n1 * (s_noise * up)
        denoised_2 = _denoise(denoiser, x_2, s_mid, extra)
        down, up = _ancestral_step(s[i], s[i + 1], eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = denoised_d + (down / s[i]) * (x - denoised_d) + n2 * (s_noise * up)
    return x


# ----------------------------------------------------------------------------- multistep


def _lms_coefficient(nodes: list[float], j: int, start: float, end: float) -> float:
    """``integral_start^end prod_{k != j} (tau - n_k) / (n_j - n_k) dtau`` over the distinct
    levels ``nodes`` (newest first), exact (the integrand is a polynomial of degree
    ``len(nodes) - 1``; plain floats, 50x faster than numpy's Polynomial at these sizes)."""
    coeffs = [1.0]  # of the Lagrange basis polynomial, lowest power first
    for k, node in enumerate(nodes):
        if k != j:
            scale = nodes[j] - node
            coeffs = [(lower - node * same) / scale for lower, same in zip([0.0, *coeffs], [*coeffs, 0.0])]
    return sum(c / (p + 1) * (end ** (p + 1) - start ** (p + 1)) for p, c in enumerate(coeffs))


def sample_lms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the derivatives of the last
    ``order`` steps (k-diffusion ``sample_lms``, diffusers LMSDiscreteScheduler)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
        raise SamplerError(f"LMS order must be an integer in [1, 4], got {order!r}")
    ds: list[torch.Tensor] = []  # derivatives at the last distinct levels, oldest first
    levels: list[float] = []
    for i in range(len(s) - 1):
        denoised = _denoise(denoiser, x, s[i], extra)
        _report(callback, i, x, s[i], denoised)
        if levels and levels[-1] == s[i]:  # the level repeats: its newer derivative replaces the old
            ds, levels = ds[:-1], levels[:-1]
        ds, levels = (ds + [(x - denoised) / s[i]])[-order:], (levels + [s[i]])[-order:]
        if s[i + 1] == s[i]:
            continue  # a zero-length step
        nodes = levels[::-1]
        coeffs = [_lms_coefficient(nodes, j, s[i], s[i + 1]) for j in range(len(nodes))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def _unipc_coefficients(
    rks: list[float], hh: float, variant: str
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """UniPC's ``(h phi_1, B(h), R, b)`` for ratios ``rks`` (last one 1) and ``hh = -h``.

    ``R[j] = rks ** j``, ``b[j] = h phi_{j+2}(hh) * (j+1)! / B(h)`` (Zhao et al. 2023, alg. 2);
    B(h) = hh (bh1) or expm1(hh) (bh2)."""
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    R, b = [], []
    for j in range(1, len(rks) + 1):
        R.append([rk ** (j - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, np.array(R), np.array(b)


def sample_unipc(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    order: int = 2,
    variant: str = "bh2",
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the UniP predictor of ``order`` on past x0 predictions,
    and after each network call the UniC corrector that reuses that call, in
    ``lambda = -log sigma``. Orders warm up from 1 and drop to 1 for the last step;
    no corrector after the last step. diffusers UniPCMultistepScheduler (predict_x0,
    ``variant`` = solver_type)."""
    s, extra = _prepare(x, sigmas), extra_args or {}
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise SamplerError(f"UniPC order must be an integer in [1, 3], got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise SamplerError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    ms: list[torch.Tensor] = []  # past x0 predictions at distinct levels, newest last
    lams: list[float] = []  # their lambdas
    last_x: torch.Tensor | None = None  # x before the last predictor step (None: no step to correct)
    last_order = 0
    for i in range(n):
        denoised = _denoise(denoiser, x, s[i], extra)
        if last_x is not None:  # UniC: correct x_i with the call just made
            x = _unipc_correct(x_prev=last_x, s_prev=s_last, s_now=s[i], denoised=denoised, ms=ms, lams=lams,
                               lam_now=lam[i], order=last_order, variant=variant)
        _report(callback, i, x, s[i], denoised)
        if lams and lams[-1] == lam[i]:  # the level repeats: its newer x0 replaces the old
            ms, lams = ms[:-1], lams[:-1]
        ms, lams = (ms + [denoised])[-order:], (lams + [lam[i]])[-order:]
        if s[i + 1] == s[i]:  # a zero-length step: nothing to predict, nothing to correct
            last_x = None
            continue
        p = min(order, n - i, len(ms))
        last_x, s_last, last_order = x, s[i], p
        m0 = ms[-1]
        if s[i + 1] == 0:  # p == 1 here: the first-order step to sigma 0 returns x0
            x = m0
            continue
        h = lam[i + 1] - lam[i]
        rks = [(lams[-1 - k] - lam[i]) / h for k in range(1, p)] + [1.0]
        h_phi_1, b_h, R, b = _unipc_coefficients(rks, -h, variant)
        x_new = (s[i + 1] / s[i]) * x - h_phi_1 * m0
        if p >= 2:
            rhos_p = [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            pred = sum(rhos_p[k - 1] * (ms[-(k + 1)] - m0) / rks[k - 1] for k in range(1, p))
            x_new = x_new - b_h * pred
        x = x_new
    return x


def _unipc_correct(
    *, x_prev: torch.Tensor, s_prev: float, s_now: float, denoised: torch.Tensor, ms: list[torch.Tensor],
    lams: list[float], lam_now: float, order: int, variant: str,
) -> torch.Tensor:
    """UniC: ``x`` at ``s_now`` recomputed from ``x_prev`` at ``s_prev`` (the predictor's start,
    whose x0 is ``ms[-1]`` at ``lams[-1]``) with the new x0 ``denoised``, to ``order``."""
    m0 = ms[-1]
    h = lam_now - lams[-1]
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, order)] + [1.0]
    h_phi_1, b_h, R, b = _unipc_coefficients(rks, -h, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    corr = rhos[-1] * (denoised - m0)
    for k in range(1, order):
        corr = corr + rhos[k - 1] * (ms[-(k + 1)] - m0) / rks[k - 1]
    return (s_now / s_prev) * x_prev - h_phi_1 * m0 - b_h * corr
