"""Multistep samplers on a history of past predictions: LMS (Adams-Bashforth in sigma) and
UniPC (Zhao et al. 2023). The signature and contract are :mod:`opensd.diffusion.samplers`'s.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from opensd.diffusion.sampler_base import Callback, DenoiserFn, SamplerError, _denoise, _prepare, _report


def _lms_coefficient(nodes: list[float], j: int, start: float, end: float) -> float:
    """``integral_start^end prod_{k != j} (tau - n_k) / (n_j - n_k) dtau`` over the distinct
    levels ``nodes`` (newest first), exact (the integrand is a polynomial of degree
    ``len(nodes) - 1``; plain floats, 50x faster than numpy's Polynomial at these sizes)."""
    coeffs = [1.0]  # of the Lagrange basis polynomial, lowest power first
    for k, node in enumerate(nodes):
        if k != j:
            scale = nodes[j] - node
            coeffs = [(lower - node * same) / scale for lower, same in zip([0.0, *coeffs], [*coeffs, 0.0], strict=False)]
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
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
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
    last_order, s_last = 0, 0.0  # the order and sigma of the step last_x started
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
