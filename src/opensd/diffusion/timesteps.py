"""The timestep grids of inference, apart from the sigma schedules of :mod:`opensd.diffusion.schedules`.

Which sigmas a sampler visits for a given number of steps is a convention of the
scheduler it imitates. :class:`TimestepRule` names the three conventions diffusers
uses so that each sampler reproduces its diffusers scheduler exactly:

* ``EULER_RULE`` - Euler/Heun/LMS/KDPM2 (and k-diffusion samplers): ``steps``
  (possibly fractional) timesteps, sigma by linear interpolation, then 0.
* ``DDIM_RULE`` / ``DDPM_RULE`` - integer timesteps; DDIM ends at
  ``alphas_cumprod[0]`` unless ``set_alpha_to_one`` (so its last sigma is > 0),
  DDPM ends at sigma 0.
* ``DPM_RULE`` - DPMSolverMultistep/UniPC: a grid of ``steps + 1`` integer
  timesteps without its last point; Karras/exponential sigmas span the whole
  training range and (Karras) the network sees rounded timesteps.
* ``LCM_RULE`` / ``TCD_RULE`` - LCMScheduler/TCDScheduler (Luo et al. 2023, Zheng et
  al. 2024): ``steps`` timesteps evenly spaced in index over the ``original_steps``
  timesteps the model was distilled on (``T // original_steps`` apart, ending at
  ``T // original_steps - 1``); LCM ends at sigma 0, TCD at timestep 0's sigma.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from opensd.errors import OpenSDError


class ScheduleError(OpenSDError):
    """A bad argument to a schedule function (step count, strength, sigma shape)."""


class SigmaSpacing(enum.Enum):
    """Where the sigmas of a sampling run lie.

    ``DEFAULT``: at the timesteps of the model's timestep spacing. ``KARRAS``: uniform
    in ``sigma ** (1/7)`` (Karras et al. 2022, eq. 5, rho = 7). ``EXPONENTIAL``:
    uniform in ``log sigma``. ``SGM_UNIFORM``: uniform in the timestep from the last
    training timestep (T - 1) down to 0, the end point left out (A1111's "SGM Uniform",
    the discretization of Stability's sgm code): its first step is at t = T - 1 whatever
    the model's timestep spacing, as distilled few-step models (SD-Turbo, SDXL-Turbo;
    Sauer et al. 2023) need. At 1 step it is t = 999, as diffusers' "trailing" spacing.
    """

    DEFAULT = "default"
    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    SGM_UNIFORM = "sgm_uniform"


class TimestepGrid(enum.Enum):
    """The timestep grid of a diffusers scheduler family (see :meth:`DiscreteSchedule.timesteps_for`)."""

    EULER = "euler"  # steps points; linspace spacing stays fractional
    DDIM = "ddim"  # steps points, rounded to integers
    DPM = "dpm"  # steps + 1 integer points, the last one dropped
    LCM = "lcm"  # steps points picked from the original_steps-point skipping grid (LCM/TCD)


class FinalSigma(enum.Enum):
    """The last sigma of a run: 0, or DDIM's ``alphas_cumprod[0]`` unless ``set_alpha_to_one``."""

    ZERO = "zero"
    DDIM = "ddim"
    FIRST = "first"  # timestep 0's sigma, whatever set_alpha_to_one (TCD ends there)


class SigmaRange(enum.Enum):
    """The ends of Karras/exponential sigmas: the default grid's ends or the whole training range."""

    GRID = "grid"
    TRAIN = "train"


@dataclass(frozen=True)
class TimestepRule:
    """How a sampler's sigmas are made from a step count (one per diffusers scheduler family).

    ``quantize_karras_t``: with Karras sigmas the network is called at the timestep
    rounded to an integer (DPMSolverMultistep/UniPC); the sampler itself still uses
    the exact sigmas. See :meth:`quantize_t`.

    ``original_steps``: for ``TimestepGrid.LCM``, the number of timesteps of the grid the
    model was distilled on (diffusers' ``original_inference_steps``); a run's ``steps``
    are picked from it, so at most that many (with the default spacing).
    """

    grid: TimestepGrid = TimestepGrid.EULER
    final_sigma: FinalSigma = FinalSigma.ZERO
    sigma_range: SigmaRange = SigmaRange.GRID
    quantize_karras_t: bool = False
    original_steps: int | None = None

    def __post_init__(self) -> None:
        if (self.grid is TimestepGrid.LCM) != (self.original_steps is not None):
            raise ScheduleError("original_steps is given exactly for the LCM grid")
        n = self.original_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ScheduleError(f"original_inference_steps must be an integer >= 1, got {n!r}")

    def check_steps(self, steps: int, spacing: SigmaSpacing) -> None:
        """Raise :class:`ScheduleError` when ``steps`` cannot be laid on this grid (LCM: more than
        ``original_steps`` at the default spacing; any count works with the other spacings)."""
        if self.original_steps is not None and spacing is SigmaSpacing.DEFAULT and steps > self.original_steps:
            raise ScheduleError(
                f"{steps} steps do not fit the consistency models' grid of original_inference_steps="
                f"{self.original_steps}: use at most {self.original_steps} steps, a larger "
                f"original_inference_steps, or a Karras/Exponential/SGM Uniform schedule"
            )

    def quantize_t(self, spacing: SigmaSpacing) -> bool:
        """Whether the network should see integer timesteps for this spacing."""
        if self.grid is TimestepGrid.EULER:
            return False
        if spacing is SigmaSpacing.KARRAS:
            return self.quantize_karras_t
        # default spacing on an integer grid: the timesteps are integers already
        return spacing is SigmaSpacing.DEFAULT


EULER_RULE = TimestepRule(TimestepGrid.EULER, FinalSigma.ZERO, SigmaRange.GRID)
DDIM_RULE = TimestepRule(TimestepGrid.DDIM, FinalSigma.DDIM, SigmaRange.GRID)
DDPM_RULE = TimestepRule(TimestepGrid.DDIM, FinalSigma.ZERO, SigmaRange.GRID)
DPM_RULE = TimestepRule(TimestepGrid.DPM, FinalSigma.ZERO, SigmaRange.TRAIN, quantize_karras_t=True)
LCM_RULE = TimestepRule(TimestepGrid.LCM, FinalSigma.ZERO, SigmaRange.GRID, original_steps=50)
TCD_RULE = TimestepRule(TimestepGrid.LCM, FinalSigma.FIRST, SigmaRange.GRID, original_steps=50)


def strength_start(steps: int, strength: float) -> int:
    """Index of the first of ``steps`` steps an img2img run of ``strength`` takes.

    diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``: the run keeps the last
    ``min(int(steps * strength), steps)`` steps.
    """
    if not 0.0 <= strength <= 1.0:
        raise ScheduleError(f"strength must be in [0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)
