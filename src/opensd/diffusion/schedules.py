"""Discrete noise schedules of DDPM-style models, seen as noise levels sigma.

A model trained with ``num_train_timesteps`` discrete steps (Ho et al. 2020) has
betas, ``alphas_cumprod[t] = prod_{s<=t}(1 - beta_s)``, and a noisy latent
``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (the variance-preserving, "VP", form).
Dividing by ``sqrt(a_t)`` gives the variance-exploding form of Karras et al. 2022
(k-diffusion), ``x = x0 + sigma_t eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``;
all samplers here work in that form and take a decreasing list of sigmas.

Which timesteps a run visits, by the convention of the diffusers scheduler each sampler
imitates, is :mod:`opensd.diffusion.timesteps`'s (``TimestepRule``, ``EULER_RULE``...).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from opensd.config import ConfigError
from opensd.diffusion.timesteps import (
    DDIM_RULE,
    DDPM_RULE,
    DPM_RULE,
    EULER_RULE,
    LCM_RULE,
    TCD_RULE,
    FinalSigma,
    ScheduleError,
    SigmaRange,
    SigmaSpacing,
    TimestepGrid,
    TimestepRule,
    strength_start,
)

__all__ = [
    "DDIM_RULE",
    "DDPM_RULE",
    "DPM_RULE",
    "EULER_RULE",
    "LCM_RULE",
    "TCD_RULE",
    "BetaSchedule",
    "DiscreteSchedule",
    "FinalSigma",
    "NoiseScheduleConfig",
    "Prediction",
    "ScheduleError",
    "SigmaRange",
    "SigmaSpacing",
    "TimestepGrid",
    "TimestepRule",
    "TimestepSpacing",
    "exponential_sigmas",
    "initial_noise_scale",
    "karras_sigmas",
    "make_betas",
    "strength_start",
    "to_vp",
]


# ----------------------------------------------------------------------------- enums


class BetaSchedule(enum.Enum):
    """How betas are laid out over the training timesteps (diffusers' ``beta_schedule``)."""

    SCALED_LINEAR = "scaled_linear"  # linspace of sqrt(beta), squared (LDM / SD)
    LINEAR = "linear"  # DDPM
    COSINE = "squaredcos_cap_v2"  # Nichol & Dhariwal 2021, betas capped at 0.999

    @classmethod
    def _missing_(cls, value: object) -> BetaSchedule | None:
        return cls.COSINE if isinstance(value, str) and value == "cosine" else None


class Prediction(enum.Enum):
    """What the network predicts: the noise ``eps`` or ``v = sqrt(a) eps - sqrt(1-a) x0``
    (Salimans & Ho 2022)."""

    EPS = "epsilon"
    V = "v_prediction"

    @classmethod
    def _missing_(cls, value: object) -> Prediction | None:
        return {"eps": cls.EPS, "v": cls.V}.get(value) if isinstance(value, str) else None


class TimestepSpacing(enum.Enum):
    """How inference timesteps are picked (Lin et al. 2023, "Common diffusion noise
    schedules and sample steps are flawed", Table 2)."""

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


# ----------------------------------------------------------------------------- config

# keys of a diffusers scheduler_config.json that change the schedule or the sampling
# math, with the only values we reproduce
_DIFFUSERS_SUPPORTED_ONLY = {
    "trained_betas": (None,),
    "rescale_betas_zero_snr": (False,),
    "clip_sample": (False,),
    "thresholding": (False,),
    "timestep_type": ("discrete",),
}


@dataclass(frozen=True)
class NoiseScheduleConfig:
    """The training noise schedule of a model; the defaults are SD 1.x's scheduler config."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR
    prediction: Prediction = Prediction.EPS
    timestep_spacing: TimestepSpacing = TimestepSpacing.LEADING
    steps_offset: int = 1
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"need 0 < beta_start <= beta_end < 1, got beta_start={self.beta_start}, beta_end={self.beta_end}"
            )
        if not 0 <= self.steps_offset < self.num_train_timesteps:
            raise ConfigError(f"steps_offset must be in [0, num_train_timesteps), got {self.steps_offset}")
        for name, cls in (
            ("beta_schedule", BetaSchedule),
            ("prediction", Prediction),
            ("timestep_spacing", TimestepSpacing),
        ):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> NoiseScheduleConfig:
        """Read a diffusers ``scheduler_config.json`` dict (any scheduler class).

        Keys that only tune one sampler (``use_karras_sigmas``, ``solver_order``, ...)
        are ignored; keys absent take this class's defaults (SD 1.x). Values we cannot
        reproduce (custom ``trained_betas``, zero-terminal-SNR rescaling, x0 clipping,
        an unknown ``beta_schedule``/``prediction_type``/``timestep_spacing``) raise
        :class:`ConfigError`.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"scheduler config: expected a dict, got {type(d).__name__}")
        for key, allowed in _DIFFUSERS_SUPPORTED_ONLY.items():
            if key in d and d[key] not in allowed:
                raise ConfigError(
                    f"scheduler config: {key}={d[key]!r} is not supported; allowed: {', '.join(map(repr, allowed))}"
                )

        def enum_value(key: str, enum_cls: type[enum.Enum]) -> Any:
            try:
                return enum_cls(d[key])
            except (ValueError, TypeError):
                allowed = ", ".join(repr(m.value) for m in enum_cls)
                raise ConfigError(
                    f"scheduler config: {key}={d[key]!r} is not supported; choose one of {allowed}"
                ) from None

        kw: dict[str, Any] = {}
        for key in ("num_train_timesteps", "steps_offset"):
            if key in d:
                if isinstance(d[key], bool) or not isinstance(d[key], int):
                    raise ConfigError(f"scheduler config: {key} must be an integer, got {d[key]!r}")
                kw[key] = d[key]
        for key in ("beta_start", "beta_end"):
            if key in d:
                if isinstance(d[key], bool) or not isinstance(d[key], (int, float)):
                    raise ConfigError(f"scheduler config: {key} must be a number, got {d[key]!r}")
                kw[key] = float(d[key])
        if "set_alpha_to_one" in d:
            if not isinstance(d["set_alpha_to_one"], bool):
                got = d["set_alpha_to_one"]
                raise ConfigError(f"scheduler config: set_alpha_to_one must be true or false, got {got!r}")
            kw["set_alpha_to_one"] = d["set_alpha_to_one"]
        if "beta_schedule" in d:
            kw["beta_schedule"] = enum_value("beta_schedule", BetaSchedule)
        if "prediction_type" in d:
            kw["prediction"] = enum_value("prediction_type", Prediction)
        if "timestep_spacing" in d:
            kw["timestep_spacing"] = enum_value("timestep_spacing", TimestepSpacing)
        return cls(**kw)

    def to_diffusers(self) -> dict[str, Any]:
        """A dict any diffusers scheduler's ``from_config`` accepts, giving this schedule."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule.value,
            "prediction_type": self.prediction.value,
            "timestep_spacing": self.timestep_spacing.value,
            "steps_offset": self.steps_offset,
            "set_alpha_to_one": self.set_alpha_to_one,
            "clip_sample": False,
            "trained_betas": None,
        }


# ----------------------------------------------------------------------------- helpers


def make_betas(cfg: NoiseScheduleConfig) -> torch.Tensor:
    """Betas (T,) float32, computed as diffusers does (so ``alphas_cumprod`` match bit for bit)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule is BetaSchedule.LINEAR:
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule is BetaSchedule.SCALED_LINEAR:
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2

    # cosine: alpha_bar(t) = cos((t + s) / (1 + s) * pi/2)^2 with s = 0.008, betas capped at 0.999
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """``n`` sigmas from ``sigma_max`` down to ``sigma_min``, uniform in ``sigma^(1/rho)``
    (Karras et al. 2022, eq. 5). float64, without the final 0."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.asarray((hi + ramp * (lo - hi)) ** rho)  # (n,) float64


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """``n`` sigmas from ``sigma_max`` down to ``sigma_min``, uniform in ``log sigma``."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _distinct_in_range(ts: np.ndarray, steps: int, num_train_timesteps: int) -> bool:
    """Whether ``ts`` is ``steps`` strictly decreasing timesteps inside ``[0, T - 1]``."""
    ts = np.asarray(ts, dtype=np.float64)
    return (
        len(ts) == steps
        and bool(np.all(np.diff(ts) < 0))
        and float(ts.min()) >= 0
        and float(ts.max()) <= num_train_timesteps - 1
    )


def initial_noise_scale(sigma_max: float) -> float:
    """Scale of unit noise at the first sigma of text-to-image: ``sqrt(sigma^2 + 1)``, the std of
    ``x = x0 + sigma eps`` for unit-variance latents (a VP ``x_T ~ N(0, 1)``), where diffusers'
    schedulers start with SD's ``leading`` spacing. k-diffusion starts at ``sigma`` instead,
    0.2% lower at SD's sigma_max of 14.6."""
    return float((float(sigma_max) ** 2 + 1.0) ** 0.5)


def to_vp(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """A k-diffusion latent ``x = x0 + sigma eps`` in VP form ``sqrt(a) x0 + sqrt(1-a) eps``."""
    return x / (1.0 + torch.as_tensor(sigma, dtype=torch.float32).to(x.device) ** 2).sqrt().to(x.dtype)


# ----------------------------------------------------------------------------- schedule


class DiscreteSchedule:
    """Betas, ``alphas_cumprod`` and sigmas of all training timesteps, and the sigma
    lists samplers run on. Immutable after construction; safe to share between threads.

    ``betas``, ``alphas_cumprod``, ``sigmas``: (T,) float32, index = training timestep,
    ``sigmas`` increasing.
    """

    def __init__(self, cfg: NoiseScheduleConfig | None = None) -> None:
        self.config = cfg if cfg is not None else NoiseScheduleConfig()
        self.betas = make_betas(self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.double().log()  # (T,) float64, for interpolation
        self._sigmas_np = self.sigmas.numpy().astype(np.float64)

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- conversions ------------------------------------------------------------------

    def sigma_to_t(self, sigma: torch.Tensor | float, *, quantize: bool = False) -> torch.Tensor:
        """Continuous timestep of each sigma: linear interpolation in log sigma between
        the two training timesteps around it, clamped to [0, T-1] (k-diffusion's
        ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t``). ``quantize``
        rounds to the nearest integer timestep. Returns float32, shape of ``sigma``."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_sigmas) - 2)
        low = low.reshape(log_sigma.shape)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * (low + 1)
        if quantize:
            t = t.round()
        return t.float()

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Sigma at continuous timestep ``t``: linear interpolation in log sigma, the exact
        inverse of :meth:`sigma_to_t` on [0, T-1] (k-diffusion ``t_to_sigma``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.min() < 0 or t.max() > self.num_train_timesteps - 1:
            raise ScheduleError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        log_sigmas = self.log_sigmas.to(t.device)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp().float()

    # -- inference schedules ------------------------------------------------------------

    def timesteps_for(
        self, steps: int, grid: TimestepGrid = TimestepGrid.EULER, *, original_steps: int = 50
    ) -> np.ndarray:
        """``steps`` strictly decreasing timesteps (float64) in ``[0, T - 1]``.

        The LCM grid (``original_steps``, LCMScheduler's ``original_inference_steps``) is
        :meth:`lcm_timesteps`.

        They are those diffusers' scheduler family ``grid`` uses for ``steps`` steps under
        this config's ``timestep_spacing`` and ``steps_offset``, wherever diffusers' formula
        gives ``steps`` distinct timesteps inside the training range. Near ``steps = T`` it
        does not (leading spacing reaches ``T`` or repeats ``steps_offset``, trailing gets one
        timestep too many at -1, the DPM grid's linspace rounds two points together: a
        repeated noise level, a division by zero in the samplers); there the timesteps are
        spread evenly over ``[0, T - 1]`` instead (rounded on the integer grids).
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_train_timesteps:
            raise ScheduleError(f"steps must be an integer in [1, {self.num_train_timesteps}], got {steps!r}")
        if grid is TimestepGrid.LCM:
            return self.lcm_timesteps(steps, original_steps)
        ts = self._diffusers_timesteps(steps, grid)
        if not _distinct_in_range(ts, steps, self.num_train_timesteps):
            ts = np.linspace(self.num_train_timesteps - 1, 0, steps)
            ts = ts.astype(np.float32) if grid is TimestepGrid.EULER else ts.round()
        return ts.astype(np.float64).copy()

    def lcm_timesteps(self, steps: int, original_steps: int = 50) -> np.ndarray:
        """LCMScheduler's / TCDScheduler's ``steps`` timesteps (float64, decreasing): the
        ``original_steps`` "skipping" timesteps ``k - 1, 2k - 1, ..., original_steps * k - 1``
        (``k = T // original_steps``) the model was distilled on, taken at the indices
        ``floor(linspace(0, original_steps, steps, endpoint=False))`` from the top (Luo et al.
        2023, sec. 4.3). 4 of 50 on SD's 1000: 999, 759, 499, 259."""
        T = self.num_train_timesteps
        if isinstance(original_steps, bool) or not isinstance(original_steps, int) or not 1 <= original_steps <= T:
            raise ScheduleError(f"original_inference_steps must be an integer in [1, {T}], got {original_steps!r}")
        TimestepRule(TimestepGrid.LCM, original_steps=original_steps).check_steps(steps, SigmaSpacing.DEFAULT)
        origin = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
        index = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
        return origin[index].astype(np.float64)

    def _diffusers_timesteps(self, steps: int, grid: TimestepGrid) -> np.ndarray:
        """diffusers' own formula for the timesteps of ``grid`` (may leave the training range)."""
        T, spacing, offset = self.num_train_timesteps, self.config.timestep_spacing, self.config.steps_offset
        if spacing is TimestepSpacing.TRAILING:  # the same for all three families
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        elif grid is TimestepGrid.DPM:
            if spacing is TimestepSpacing.LINSPACE:
                ts = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
            else:
                ts = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + offset
        elif spacing is TimestepSpacing.LINSPACE:
            ts = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
            if grid is TimestepGrid.DDIM:
                ts = ts.round()
        else:  # leading
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + offset
        if grid is TimestepGrid.EULER:
            ts = ts.astype(np.float32)
        return ts.astype(np.float64)

    def sigmas_from_timesteps(self, timesteps: np.ndarray | torch.Tensor) -> np.ndarray:
        """Sigmas at (possibly fractional) timesteps by linear interpolation in sigma
        (diffusers' ``np.interp`` rule; exact training sigmas at integer timesteps)."""
        ts = np.asarray(timesteps, dtype=np.float64)
        return np.interp(ts, np.arange(self.num_train_timesteps), self._sigmas_np)

    def sgm_uniform_sigmas(self, steps: int) -> np.ndarray:
        """``steps`` sigmas (float64, without the final 0) at timesteps uniform from T - 1
        down to 0 with the end point left out, sigma by log-linear interpolation (A1111's
        ``sgm_uniform``: ``linspace(t(sigma_max), t(sigma_min), steps + 1)[:-1]``)."""
        ts = torch.linspace(self.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float32)[:-1]
        return self.t_to_sigma(ts).double().numpy()

    def sigmas_for(
        self,
        steps: int,
        spacing: SigmaSpacing = SigmaSpacing.DEFAULT,
        *,
        rule: TimestepRule = EULER_RULE,
        strength: float = 1.0,
    ) -> torch.Tensor:
        """The decreasing sigmas (float32, length ``k + 1``) a sampler runs on.

        Built as diffusers' scheduler of family ``rule`` builds them for ``steps`` steps
        with ``spacing``; the last entry is 0, or for ``FinalSigma.DDIM`` the sigma of
        ``alphas_cumprod[0]`` unless ``set_alpha_to_one``. ``strength < 1`` keeps the last
        ``k = int(steps * strength)`` steps (img2img, :func:`strength_start`); ``k``
        must be >= 1.
        """
        if not isinstance(spacing, SigmaSpacing):
            raise ScheduleError(f"spacing must be a SigmaSpacing, got {spacing!r}")
        if rule.original_steps is not None:  # the LCM grid
            rule.check_steps(steps, spacing)
            # Karras/exponential/SGM sigmas take any count: the grid only gives their ends
            ts = self.lcm_timesteps(min(steps, rule.original_steps), rule.original_steps)
        else:
            ts = self.timesteps_for(steps, rule.grid)
        start = strength_start(steps, strength)
        sig = self.sigmas_from_timesteps(ts)
        if spacing is SigmaSpacing.SGM_UNIFORM:
            sig = self.sgm_uniform_sigmas(steps)
        elif spacing is not SigmaSpacing.DEFAULT:
            if rule.sigma_range is SigmaRange.TRAIN:
                lo, hi = self.sigma_min, self.sigma_max
            else:
                lo, hi = float(sig[-1]), float(sig[0])
            make = karras_sigmas if spacing is SigmaSpacing.KARRAS else exponential_sigmas
            sig = make(lo, hi, steps)
        if rule.final_sigma is FinalSigma.FIRST or (
            rule.final_sigma is FinalSigma.DDIM and not self.config.set_alpha_to_one
        ):
            last = self.sigma_min
        else:
            last = 0.0
        out = torch.from_numpy(np.concatenate([sig, [last]]).astype(np.float32))
        if start >= steps:
            raise ScheduleError(
                f"strength {strength} with {steps} steps leaves no step to run; "
                f"need int(steps * strength) >= 1"
            )
        return out[start:].clone()

    def __repr__(self) -> str:
        fs = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}" for f in fields(self.config))
        return f"DiscreteSchedule({fs})"
